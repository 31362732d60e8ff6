package primary

import (
	"context"
	"net"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// fixedAuth authenticates every caller as id by token (a unit-test stand-in for the CA).
type fixedAuth struct{ id mesh.Identity }

func (a fixedAuth) Authenticate(context.Context, mesh.ClusterID) (mesh.Identity, bool, error) {
	return a.id, false, nil
}

// TestSecureStreamKeepsItsNode: a stream bound to one node is refused when a later
// request names another, and the refusal is counted; closing streams leaves no proxy.
func TestSecureStreamKeepsItsNode(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system", Labels: map[string]string{LabelNetwork: "net-1"}}})
	p, err := New(Config{ClusterID: "local", LocalClient: client, Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	if err := p.RegisterSecureXDS(ctx, gs, fixedAuth{mesh.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"}}, SecureOptions{}); err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	defer gs.Stop()
	go p.Run(ctx)
	for deadline := time.Now().Add(10 * time.Second); !p.Ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("primary not ready")
		}
	}
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	good := node("sidecar~10.0.0.1~echo-1.demo~demo.svc.cluster.local", map[string]any{"GENERATOR": "grpc", "NETWORK": "net-1"})
	s, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discovery.DiscoveryRequest{Node: good, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatalf("authenticated stream: %v", err)
	}
	if ps := p.SecureProxies(); len(ps) != 1 || ps[0].Identity != "spiffe://cluster.local/ns/demo/sa/echo" || ps[0].Network != "net-1" || ps[0].Cluster != "local" {
		t.Fatalf("proxies %+v", ps)
	}
	other := node("sidecar~10.0.0.2~other-1.demo~demo.svc.cluster.local", map[string]any{"GENERATOR": "grpc", "NETWORK": "net-1"})
	if err := s.Send(&discovery.DiscoveryRequest{Node: other, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err = s.Recv(); err != nil {
			break
		}
	}
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a changed node: %v, want PermissionDenied", err)
	}
	for deadline := time.Now().Add(5 * time.Second); len(p.SecureProxies()) != 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("a closed stream is still listed: %+v", p.SecureProxies())
		}
	}
}
