package remote_test

import (
	"context"
	"testing"

	authzv1 "k8s.io/api/authorization/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/remote"
)

// can asks the API server whether the client may do verb on resource in ns.
func can(t *testing.T, c kubernetes.Interface, verb, group, resource, ns string) bool {
	t.Helper()
	r, err := c.AuthorizationV1().SelfSubjectAccessReviews().Create(context.Background(), &authzv1.SelfSubjectAccessReview{
		Spec: authzv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{Verb: verb, Group: group, Resource: resource, Namespace: ns}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Status.Allowed
}

// TestCreateConfigType: a config cluster's credential reads what an external control
// plane needs — the reader's rights, the Istio configuration kinds, the remote secrets
// of its namespace — and nothing more; its secret is not a remote secret.
func TestCreateConfigType(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	c := shared[0]
	created, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), remote.CreateOptions{Cluster: "config-1", Type: remote.TypeConfig, ServiceAccount: "isthmus-config"})
	if err != nil {
		t.Fatal(err)
	}
	if created.Secret.Labels[remote.MultiClusterLabel] != "" {
		t.Fatalf("a config secret is labelled as a remote secret: %v", created.Secret.Labels)
	}
	// Its kubeconfig is the control plane's --kubeconfig; parse it as a primary would.
	s := created.Secret.DeepCopy()
	s.Labels[remote.MultiClusterLabel] = "true"
	reader := readerClient(t, s)
	for _, ok := range []struct{ verb, group, resource, ns string }{
		{"list", "", "services", ""}, {"watch", "", "pods", ""}, {"create", "authentication.k8s.io", "tokenreviews", ""},
		{"list", "networking.istio.io", "virtualservices", ""}, {"watch", "security.istio.io", "authorizationpolicies", "demo"},
		{"list", "", "secrets", "istio-system"}, {"watch", "", "secrets", "istio-system"},
	} {
		if !can(t, reader, ok.verb, ok.group, ok.resource, ok.ns) {
			t.Errorf("may not %s %s/%s in %q", ok.verb, ok.group, ok.resource, ok.ns)
		}
	}
	for _, no := range []struct{ verb, group, resource, ns string }{
		{"get", "", "secrets", "istio-system"}, {"list", "", "secrets", "default"}, {"list", "", "secrets", ""},
		{"create", "networking.istio.io", "virtualservices", "demo"}, {"get", "networking.istio.io", "virtualservices", "demo"},
		{"list", "", "configmaps", ""}, {"create", "", "pods", "default"},
	} {
		if can(t, reader, no.verb, no.group, no.resource, no.ns) {
			t.Errorf("may %s %s/%s in %q", no.verb, no.group, no.resource, no.ns)
		}
	}
	// A real list of the control-plane namespace's secrets works; another namespace's is refused.
	if _, err := reader.CoreV1().Secrets("istio-system").List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("list secrets in istio-system: %v", err)
	}
	if _, err := reader.CoreV1().Secrets("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("list secrets in default: want Forbidden, got %v", err)
	}
	if _, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), remote.CreateOptions{Cluster: "x", Type: "istio"}); err == nil {
		t.Fatal("an unknown type was accepted")
	}
}
