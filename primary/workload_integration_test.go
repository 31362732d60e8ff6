package primary_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/xds"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// narrowSidecar scopes the pods of namespace "sel" labelled scope=narrow to their own
// namespace's services.
const narrowSidecar = `
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: narrow, namespace: sel}
spec:
  workloadSelector: {labels: {scope: narrow}}
  egress:
  - hosts: ["./*"]
`

// dialAsPod dials host:scopePort with a proxyless client whose node is pod ns/pod at ip
// (Istio's node ID), claiming no labels: the primary reads them from the pod.
func dialAsPod(t *testing.T, ns, pod, ip, host string) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~%s~%s.%s~%s.svc.cluster.local",
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q, "NAMESPACE": %q, "LABELS": {"scope": "wide"}}}
	}`, env.xdsAddr, ip, pod, ns, ns, env.clusters[0].Name, ns)
	rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:%d", host, scopePort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// TestSidecarSelectorScopesOnePod checks a Sidecar with workloadSelector through the API
// server with real proxyless clients: of two client pods in one namespace, the one the
// selector selects cannot resolve another namespace's service while the other can (and
// both reach their own namespace's); relabelling the pod out gives it the service back,
// relabelling it in takes it away again, and deleting the Sidecar gives it back. The
// debug views show the scoped proxy on its own view and the other on the namespace's.
func TestSidecarSelectorScopesOnePod(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	const front, hidden = "front.sel.svc.cluster.local", "hidden.vault.svc.cluster.local"
	scopeService(t, "sel", "front", "10.99.72.1")
	scopeService(t, "vault", "hidden", "10.99.72.2")
	cs := env.clients[0]
	// The client pods, selected by a Service so that relabelling them changes endpoints
	// (and pushes) as it would in a real mesh.
	for _, p := range []struct{ name, ip, scope string }{{"client-a", "10.99.72.11", "narrow"}, {"client-b", "10.99.72.12", "wide"}} {
		if _, err := cs.CoreV1().Pods("sel").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "sel", Labels: map[string]string{"app": "front", "scope": p.scope},
				Annotations: map[string]string{kubelocal.PodIPAnnotation: p.ip}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "c"}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	kubetest.Eventually(t, 20*time.Second, "client pods have their IPs", func() error {
		for _, n := range []string{"client-a", "client-b"} {
			p, err := cs.CoreV1().Pods("sel").Get(ctx, n, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if p.Status.PodIP == "" {
				return fmt.Errorf("%s has no IP yet", n)
			}
		}
		return nil
	})
	aHidden, aFront := dialAsPod(t, "sel", "client-a", "10.99.72.11", hidden), dialAsPod(t, "sel", "client-a", "10.99.72.11", front)
	bHidden := dialAsPod(t, "sel", "client-b", "10.99.72.12", hidden)
	answers := func(c testgrpc.TestServiceClient) func() error {
		return func() error {
			if _, err := callPolicy(c); err != nil {
				return err
			}
			return nil
		}
	}
	fails := func(c testgrpc.TestServiceClient) func() error {
		return func() error {
			if id, err := callPolicy(c); err == nil {
				return fmt.Errorf("still answered by %q", id)
			}
			return nil
		}
	}
	kubetest.Eventually(t, 30*time.Second, "client-a reaching hidden before any Sidecar", answers(aHidden))

	sc := &networkingv1.Sidecar{}
	if err := yaml.Unmarshal([]byte(narrowSidecar), sc); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().Sidecars("sel").Create(ctx, sc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "configz: the selector Sidecar applied", func() error {
		for _, o := range configz(t).Objects {
			if o.Kind == "Sidecar" && o.Namespace == "sel" && o.Name == "narrow" && o.Applied {
				return nil
			}
		}
		return fmt.Errorf("not applied yet")
	})
	kubetest.Eventually(t, 30*time.Second, "the selected client-a no longer resolving hidden", fails(aHidden))
	kubetest.Eventually(t, 10*time.Second, "client-a still reaching its own namespace", answers(aFront))
	kubetest.Eventually(t, 10*time.Second, "client-b (not selected, despite its node's LABELS) still reaching hidden", answers(bHidden))
	kubetest.Eventually(t, 10*time.Second, "config_dump: a view of its own for the selected pod, the namespace's for the other", func() error {
		a, b := dumpedView(t, "sidecar~10.99.72.11~client-a.sel~sel.svc.cluster.local"), dumpedView(t, "sidecar~10.99.72.12~client-b.sel~sel.svc.cluster.local")
		if !strings.HasSuffix(a, "~sel:narrow") || !strings.HasSuffix(b, "~sel") {
			return fmt.Errorf("client-a on %q, client-b on %q", a, b)
		}
		return nil
	})
	if _, err := callPolicy(dialAsPod(t, "sel", "client-a", "10.99.72.11", hidden)); err == nil {
		t.Fatal("a client-a client dialled after the Sidecar reached hidden")
	}
	// A node naming client-a with another IP is not believed to be client-a.
	kubetest.Eventually(t, 30*time.Second, "a node naming client-a at the wrong IP gets the namespace's view", answers(dialAsPod(t, "sel", "client-a", "10.99.72.99", hidden)))

	relabel := func(scope string) {
		t.Helper()
		patch := fmt.Sprintf(`{"metadata":{"labels":{"scope":%q}}}`, scope)
		if _, err := cs.CoreV1().Pods("sel").Patch(ctx, "client-a", types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	relabel("wide")
	kubetest.Eventually(t, 30*time.Second, "client-a relabelled out: reaching hidden again", answers(aHidden))
	relabel("narrow")
	kubetest.Eventually(t, 30*time.Second, "client-a relabelled in: hidden gone again", fails(aHidden))
	if err := env.istio.NetworkingV1().Sidecars("sel").Delete(ctx, "narrow", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "client-a reaching hidden once the Sidecar is deleted", answers(aHidden))
	kubetest.Eventually(t, 10*time.Second, "client-b still reaching hidden", answers(bHidden))
}

// dumpedView returns the view /debug/config_dump shows for a connected proxy's node ID.
func dumpedView(t *testing.T, id string) string {
	t.Helper()
	resp, err := http.Get(env.debug.URL + "/debug/config_dump?proxy=" + url.QueryEscape(id))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		View string `json:"view"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return fmt.Sprintf("status %s", resp.Status)
	}
	return out.View
}
