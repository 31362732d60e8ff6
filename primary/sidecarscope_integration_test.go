package primary_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/xds"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/primary"
)

// scopePort is the port of the services the Sidecar test dials.
const scopePort = 9070

// scopedSidecar lets the proxies of namespace "scoped" see only their own namespace's
// services, as a user writes it.
const scopedSidecar = `
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: scoped}
spec:
  egress:
  - hosts: ["./*"]
`

// portSidecar has a per-port egress listener, which Isthmus refuses.
const portSidecar = `
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: by-port, namespace: stock}
spec:
  egress:
  - port: {number: 9070, protocol: GRPC, name: grpc}
    hosts: ["./*"]
`

// scopeService creates namespace ns (if needed), a Service name in it and one pod behind
// it at ip, answering with its name.
func scopeService(t *testing.T, ns, name, ip string) {
	t.Helper()
	ctx := context.Background()
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "default service account in "+ns, func() error {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: scopePort, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(scopePort)))
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, &toggleServer{id: name})
	go s.Serve(lis)
	env.servers.Store(ip, s)
	if _, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: ns, Labels: map[string]string{"app": name},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: name, Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: scopePort}}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// dialFrom dials host:scopePort with a proxyless client whose node is a pod of namespace
// ns (Istio's node ID; the NAMESPACE metadata as Istio's agent sends it).
func dialFrom(t *testing.T, ns, host string) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~127.0.0.1~client-%d.%s~%s.svc.cluster.local",
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q, "NAMESPACE": %q}}
	}`, env.xdsAddr, time.Now().UnixNano(), ns, ns, env.clusters[0].Name, ns)
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

// TestSidecarScopesProxylessClient applies a Sidecar through the API server and checks
// from real proxyless clients: a client in the scoped namespace loses the service of
// another namespace (it no longer resolves) but keeps its own namespace's, a client in
// another namespace still reaches both, a freshly dialled scoped client cannot resolve
// it either, a Sidecar Isthmus cannot apply is refused without changing a view, and
// deleting the Sidecar gives the scoped client the service back.
func TestSidecarScopesProxylessClient(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	const stock, catalog = "inventory.stock.svc.cluster.local", "catalog.scoped.svc.cluster.local"
	scopeService(t, "stock", "inventory", "10.99.70.1")
	scopeService(t, "scoped", "catalog", "10.99.70.2")
	scopedStock, scopedCatalog := dialFrom(t, "scoped", stock), dialFrom(t, "scoped", catalog)
	otherStock := dialFrom(t, "elsewhere", stock)
	answers := func(c testgrpc.TestServiceClient, want string) func() error {
		return func() error {
			if id, err := callPolicy(c); id != want {
				return fmt.Errorf("answer %q, %v", id, err)
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
	kubetest.Eventually(t, 30*time.Second, "the scoped namespace's client reaching inventory before any Sidecar", answers(scopedStock, "inventory"))

	sc := &networkingv1.Sidecar{}
	if err := yaml.Unmarshal([]byte(scopedSidecar), sc); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().Sidecars("scoped").Create(ctx, sc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "configz: the Sidecar applied", func() error {
		for _, o := range configz(t).Objects {
			if o.Kind == "Sidecar" && o.Namespace == "scoped" && o.Name == "default" && o.Applied {
				return nil
			}
		}
		return fmt.Errorf("not applied yet")
	})
	kubetest.Eventually(t, 30*time.Second, "the scoped client no longer resolving inventory", fails(scopedStock))
	// Checked after the scoped view changed, so the other view is as current.
	kubetest.Eventually(t, 10*time.Second, "the scoped client still reaching its own namespace", answers(scopedCatalog, "catalog"))
	kubetest.Eventually(t, 10*time.Second, "another namespace's client still reaching inventory", answers(otherStock, "inventory"))
	if id, err := callPolicy(dialFrom(t, "scoped", stock)); err == nil {
		t.Fatalf("a scoped client dialled after the Sidecar reached inventory (%q)", id)
	} else {
		t.Logf("a scoped client dialled after the Sidecar: %v", err)
	}

	// A Sidecar Isthmus cannot apply is refused whole, reported, and scopes nothing.
	bad := &networkingv1.Sidecar{}
	if err := yaml.Unmarshal([]byte(portSidecar), bad); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().Sidecars("stock").Create(ctx, bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "configz: the per-port Sidecar refused as unsupported", func() error {
		for _, o := range configz(t).Objects {
			if o.Kind == "Sidecar" && o.Namespace == "stock" && !o.Applied && o.Reason == primary.ReasonUnsupported {
				return nil
			}
		}
		return fmt.Errorf("not refused yet")
	})
	kubetest.Eventually(t, 10*time.Second, "a Warning event on the refused Sidecar", func() error {
		evs, err := env.clients[0].CoreV1().Events("stock").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=by-port"})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && e.InvolvedObject.Kind == "Sidecar" {
				return nil
			}
		}
		return fmt.Errorf("events: %+v", evs.Items)
	})
	if _, err := callPolicy(otherStock); err != nil {
		t.Fatalf("the refused Sidecar changed the other namespace's view: %v", err)
	}

	if err := env.istio.NetworkingV1().Sidecars("scoped").Delete(ctx, "default", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "the scoped client reaching inventory again once the Sidecar is deleted", answers(scopedStock, "inventory"))
}
