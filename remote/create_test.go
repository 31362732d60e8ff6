package remote_test

import (
	"context"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/remote"
)

var shared []*kubelocal.Cluster

func TestMain(m *testing.M) {
	os.Exit(kubetest.Main(m, 2, "rs", func(c []*kubelocal.Cluster) (func(), error) {
		shared = c
		return func() {}, nil
	}))
}

func needClusters(t *testing.T) {
	t.Helper()
	if shared == nil {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
}

func admin(t *testing.T, c *kubelocal.Cluster) kubernetes.Interface {
	t.Helper()
	cs, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// readerClient parses the secret the way a primary will and returns a client for it.
func readerClient(t *testing.T, s *corev1.Secret) kubernetes.Interface {
	t.Helper()
	creds, err := remote.ParseSecret(s, remote.Policy{})
	if err != nil {
		t.Fatal(err)
	}
	if len(creds) != 1 || creds[0].Err != nil {
		t.Fatalf("credentials: %+v", creds)
	}
	cs, err := kubernetes.NewForConfig(creds[0].Config)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func TestCreateGivesLeastPrivilegeReader(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	remoteCluster := shared[1]
	created, err := remote.Create(ctx, admin(t, remoteCluster), remoteCluster.RESTConfig(), remote.CreateOptions{Cluster: "cluster-2"})
	if err != nil {
		t.Fatal(err)
	}
	if until := time.Until(created.Expires); until < 300*24*time.Hour {
		t.Fatalf("token expires in %s; want about a year", until)
	}
	reader := readerClient(t, created.Secret)

	// What a primary needs works.
	if _, err := reader.CoreV1().Services("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("list services: %v", err)
	}
	if _, err := reader.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("list endpointslices: %v", err)
	}
	w, err := reader.CoreV1().Pods("").Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("watch pods: %v", err)
	}
	w.Stop()
	tr, err := reader.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: "bogus"}}, metav1.CreateOptions{})
	if err != nil || tr.Status.Authenticated {
		t.Fatalf("token review: %v, %+v", err, tr)
	}
	// Nothing else does.
	forbidden := map[string]error{}
	_, forbidden["list secrets"] = reader.CoreV1().Secrets("").List(ctx, metav1.ListOptions{})
	_, forbidden["get a service"] = reader.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
	_, forbidden["create a configmap"] = reader.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, metav1.CreateOptions{})
	forbidden["delete a pod"] = reader.CoreV1().Pods("default").Delete(ctx, "x", metav1.DeleteOptions{})
	for what, err := range forbidden {
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s: want Forbidden, got %v", what, err)
		}
	}
}

func TestSecretSurvivesTheAPIServerAndRecreateRotates(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	remoteCluster, primary := shared[1], shared[0]
	opts := remote.CreateOptions{Cluster: "cluster-2", Namespace: "mesh-system", ServiceAccount: "reader"}
	first, err := remote.Create(ctx, admin(t, remoteCluster), remoteCluster.RESTConfig(), opts)
	if err != nil {
		t.Fatal(err)
	}
	// Apply in the primary's cluster and read back: stringData becomes data.
	pcs := admin(t, primary)
	if _, err := pcs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mesh-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := pcs.CoreV1().Secrets("mesh-system").Create(ctx, first.Secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	stored, err := pcs.CoreV1().Secrets("mesh-system").Get(ctx, first.Secret.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(stored.StringData) != 0 || len(stored.Data) != 1 {
		t.Fatalf("stored secret: %+v", stored)
	}
	if _, err := readerClient(t, stored).CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("reader from stored secret: %v", err)
	}

	// Someone widens the role; running create again puts it back and issues a new token.
	rcs := admin(t, remoteCluster)
	role, err := rcs.RbacV1().ClusterRoles().Get(ctx, "reader-mesh-system", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	role.Rules = append(role.Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"list"}})
	if _, err := rcs.RbacV1().ClusterRoles().Update(ctx, role, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	second, err := remote.Create(ctx, rcs, remoteCluster.RESTConfig(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if second.Secret.StringData["cluster-2"] == first.Secret.StringData["cluster-2"] {
		t.Fatal("create again did not issue a new token")
	}
	_, err = readerClient(t, second.Secret).CoreV1().Secrets("").List(ctx, metav1.ListOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("widened rule survived a re-create: %v", err)
	}
}

func TestServerOverrideAndTLSServerName(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	c := shared[1]
	u, _ := url.Parse(c.URL)
	// The API server's certificate names kubernetes.default.svc, not this host.
	created, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), remote.CreateOptions{
		Cluster:       "via-proxy",
		Server:        "https://localhost:" + u.Port(),
		TLSServerName: "kubernetes.default.svc",
	})
	if err != nil {
		t.Fatal(err)
	}
	kc := created.Secret.StringData["via-proxy"]
	if !strings.Contains(kc, "tls-server-name: kubernetes.default.svc") || !strings.Contains(kc, "https://localhost:"+u.Port()) {
		t.Fatalf("kubeconfig lacks the overrides:\n%s", kc)
	}
	if _, err := readerClient(t, created.Secret).CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("reader through the overridden server: %v", err)
	}

	for name, o := range map[string]remote.CreateOptions{
		"http server":   {Cluster: "x", Server: "http://" + u.Host},
		"bad cluster":   {Cluster: "not valid!"},
		"short token":   {Cluster: "x", TokenDuration: time.Minute},
		"no server url": {Cluster: "x", Server: "localhost"},
	} {
		if _, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	insecure := c.RESTConfig()
	insecure.TLSClientConfig = rest.TLSClientConfig{Insecure: true}
	if _, err := remote.Create(ctx, admin(t, c), insecure, remote.CreateOptions{Cluster: "x"}); err == nil || !strings.Contains(err.Error(), "certificate-authority-data") {
		t.Errorf("insecure source: %v", err)
	}
}
