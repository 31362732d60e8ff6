package primary

import (
	"net/netip"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

func node(id string, meta map[string]any) *core.Node {
	s, _ := structpb.NewStruct(meta)
	return &core.Node{Id: id, Metadata: s}
}

func TestDecodeNode(t *testing.T) {
	for _, tc := range []struct {
		name, id string
		meta     map[string]any
		want     NodeClaim
		err      string
	}{
		{name: "proxyless", id: "sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local",
			meta: map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": "west", "NETWORK": "net-1"},
			want: NodeClaim{Kind: ProxyGRPC, Pod: "echo-1", Namespace: "demo", Cluster: "west", Network: "net-1"}},
		{name: "gateway from the domain", id: "router~0.0.0.0~eastwest-net-1~istio-system.svc.cluster.local",
			want: NodeClaim{Kind: ProxyGateway, Pod: "eastwest-net-1", Namespace: "istio-system"}},
		{name: "metadata namespace and SA", id: "sidecar~10.1.0.10~echo-1~cluster.local",
			meta: map[string]any{"NAMESPACE": "demo", "SERVICE_ACCOUNT": "echo"},
			want: NodeClaim{Kind: ProxySidecar, Pod: "echo-1", Namespace: "demo", ServiceAccount: "echo"}},
		{name: "two namespaces", id: "sidecar~10.1.0.10~echo-1.demo~other.svc.cluster.local", err: "two namespaces"},
		{name: "metadata disagrees", id: "sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local", meta: map[string]any{"NAMESPACE": "kube-system"}, err: "two namespaces"},
		{name: "no namespace", id: "sidecar~10.1.0.10~echo-1~cluster.local", err: "names no namespace"},
		{name: "three parts", id: "sidecar~10.1.0.10~echo-1.demo", err: "want <type>"},
		{name: "bad type", id: "waypoint~10.1.0.10~echo-1.demo~demo.svc.cluster.local", err: "neither sidecar nor router"},
		{name: "bad ip", id: "sidecar~10.1.0~echo-1.demo~demo.svc.cluster.local", err: "address"},
		{name: "grpc router", id: "router~0.0.0.0~gw~istio-system.svc.cluster.local", meta: map[string]any{"GENERATOR": "grpc"}, err: "router cannot"},
		{name: "bad cluster", id: "sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local", meta: map[string]any{"CLUSTER_ID": "a b"}, err: "CLUSTER_ID"},
		{name: "bad network", id: "sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local", meta: map[string]any{"NETWORK": "net/1"}, err: "NETWORK"},
		{name: "bad namespace", id: "sidecar~10.1.0.10~echo-1.Demo_X~Demo_X.svc.cluster.local", err: "namespace"},
		{name: "empty", id: "", err: "no ID"},
		{name: "huge", id: strings.Repeat("x", 2000), err: "longer than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DecodeNode(node(tc.id, tc.meta))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.IP.IsValid() || got.ID != tc.id {
				t.Fatalf("ID %q, IP %v", got.ID, got.IP)
			}
			got.ID, got.IP = "", netip.Addr{}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzDecodeNode: any node decodes to a claim or an error, never a panic, and a claim is
// consistent: a namespace that is a DNS label, a pod, a known kind.
func FuzzDecodeNode(f *testing.F) {
	f.Add("sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local", "grpc", "west", "net-1", "")
	f.Add("router~0.0.0.0~eastwest~istio-system.svc.cluster.local", "", "", "", "istio-system")
	f.Add("sidecar~::1~a.b~b.svc", "", "c", "", "b")
	f.Add("~~~", "grpc", "", "", "")
	f.Fuzz(func(t *testing.T, id, generator, cluster, network, namespace string) {
		meta, err := structpb.NewStruct(map[string]any{"GENERATOR": generator, "CLUSTER_ID": cluster, "NETWORK": network, "NAMESPACE": namespace})
		if err != nil {
			return // not valid UTF-8: no protobuf Struct can carry it
		}
		c, err := DecodeNode(&core.Node{Id: id, Metadata: meta})
		if err != nil {
			return
		}
		if c.Namespace == "" || c.Pod == "" || !c.IP.IsValid() || (c.Kind != ProxyGRPC && c.Kind != ProxySidecar && c.Kind != ProxyGateway) {
			t.Fatalf("inconsistent claim %+v from %q", c, id)
		}
		if namespace != "" && c.Namespace != namespace {
			t.Fatalf("metadata namespace %q but claim %q", namespace, c.Namespace)
		}
	})
}
