package primary

import (
	"net/netip"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func ep(addr string, cluster mesh.ClusterID, network mesh.NetworkID, mtls bool, zone string) mesh.Endpoint {
	return mesh.Endpoint{
		Address: netip.MustParseAddr(addr), Cluster: cluster, Network: network, MTLSReady: mtls,
		Ports: []mesh.Port{{Name: "grpc", Number: 8080}}, Health: mesh.HealthHealthy,
		Locality: mesh.Locality{Region: "r", Zone: zone},
	}
}

func gw(network mesh.NetworkID, addr string) Gateway {
	return Gateway{Network: network, Address: netip.MustParseAddr(addr), Port: GatewayPort}
}

func TestSplitHorizon(t *testing.T) {
	gws := map[mesh.NetworkID][]Gateway{"n2": {gw("n2", "192.0.2.2")}, "n3": {gw("n3", "192.0.2.3"), gw("n3", "192.0.2.33")}}
	eps := []mesh.Endpoint{
		ep("10.1.0.1", "c1", "n1", true, "a"),
		ep("10.0.0.9", "c1", "", false, "a"), // no network: everyone reaches it
		ep("10.2.0.1", "c2", "n2", true, "b"),
		ep("10.2.0.2", "c2", "n2", true, "b"),
		ep("10.2.0.3", "c2", "n2", false, "b"), // cannot do mTLS: dropped elsewhere
		ep("10.3.0.1", "c3", "n3", true, "c"),
		ep("10.3.0.2", "c3", "n3", true, "c"),
		ep("10.3.0.3", "c3", "n3", true, "c"),
		ep("10.4.0.1", "c4", "n4", true, "d"), // no gateway for n4: dropped elsewhere
	}
	eps[3].Weight = 3
	type row struct {
		Addr    string
		Weight  uint32
		Gateway bool
	}
	rows := func(l []lbEndpoint) []row {
		var out []row
		for _, e := range l {
			out = append(out, row{e.Addr.String(), e.Weight, e.Gateway})
		}
		return out
	}
	tests := []struct {
		name      string
		network   mesh.NetworkID
		localOnly bool
		want      []row
	}{
		{"from n1", "n1", false, []row{
			{"10.1.0.1:8080", 1, false}, {"10.0.0.9:8080", 1, false},
			{"192.0.2.2:15443", 4, true},                                // 1 + 3, the non-mTLS endpoint left out
			{"192.0.2.3:15443", 2, true}, {"192.0.2.33:15443", 2, true}, // 3 split over 2 gateways, rounded up
		}},
		{"from n2 keeps its own non-mTLS endpoint", "n2", false, []row{
			{"10.0.0.9:8080", 1, false}, {"10.2.0.1:8080", 1, false}, {"10.2.0.2:8080", 3, false}, {"10.2.0.3:8080", 1, false},
			{"192.0.2.3:15443", 2, true}, {"192.0.2.33:15443", 2, true},
		}},
		{"n4 sees its endpoint directly", "n4", false, []row{
			{"10.0.0.9:8080", 1, false}, {"192.0.2.2:15443", 4, true}, {"192.0.2.3:15443", 2, true}, {"192.0.2.33:15443", 2, true}, {"10.4.0.1:8080", 1, false},
		}},
		{"gateway on n2 sees only n2", "n2", true, []row{
			{"10.0.0.9:8080", 1, false}, {"10.2.0.1:8080", 1, false}, {"10.2.0.2:8080", 3, false}, {"10.2.0.3:8080", 1, false},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := rows(splitHorizon(eps, "grpc", tt.network, gws, tt.localOnly))
			less := func(a, b row) bool { return a.Addr < b.Addr }
			if d := cmp.Diff(sortRows(tt.want, less), sortRows(got, less)); d != "" {
				t.Fatalf("split horizon (-want +got):\n%s", d)
			}
		})
	}
	if got := splitHorizon(eps, "http", "n1", gws, false); len(got) != 0 {
		t.Fatalf("endpoints without the port: %v", got)
	}
}

func sortRows[T any](s []T, less func(a, b T) bool) []T {
	out := append([]T(nil), s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if less(out[j], out[i]) {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func testView() *View {
	r := NewRegistry()
	svc := func(c mesh.ClusterID, vip string) *Service {
		return &Service{Hostname: "echo.demo.svc.cluster.local", Key: mesh.ServiceKey{Namespace: "demo", Name: "echo"},
			VIP: netip.MustParseAddr(vip), Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
	}
	r.UpdateService(ShardKey{SourceKubernetes, "c1"}, "echo.demo.svc.cluster.local", svc("c1", "10.96.0.10"), []mesh.Endpoint{ep("10.1.0.1", "c1", "n1", true, "a")})
	r.UpdateService(ShardKey{SourceKubernetes, "c2"}, "echo.demo.svc.cluster.local", svc("c2", "10.96.0.20"), []mesh.Endpoint{ep("10.2.0.1", "c2", "n2", true, "b")})
	r.UpdateGateways(ShardKey{SourceKubernetes, "c2"}, []Gateway{gw("n2", "192.0.2.2")})
	// Endpoints of a hostname no cluster defines are not part of the mesh.
	r.ReplaceShard(ShardKey{SourceKubernetes, "c3"}, &ShardData{Endpoints: map[mesh.Hostname][]mesh.Endpoint{"ghost.demo.svc.cluster.local": {ep("10.3.0.1", "c3", "n1", true, "c")}}})
	return r.View()
}

func TestRegistryMergesByHostname(t *testing.T) {
	v := testView()
	if len(v.Services) != 1 {
		t.Fatalf("services: %+v", v.Services)
	}
	s := v.Service("echo.demo.svc.cluster.local")
	if s == nil || len(s.Endpoints) != 2 || len(s.VIPs) != 2 || s.VIPs["c2"] != netip.MustParseAddr("10.96.0.20") {
		t.Fatalf("merged service: %+v", s)
	}
	if v.Service("ghost.demo.svc.cluster.local") != nil {
		t.Fatal("a hostname without a Service became part of the mesh")
	}
	if len(v.Gateways["n2"]) != 1 {
		t.Fatalf("gateways: %+v", v.Gateways)
	}
}

func TestBuildResourcesValidateForEveryProxyKind(t *testing.T) {
	v := testView()
	for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1"}, {Kind: ProxyGateway, Network: "n2"}, {Kind: ProxyGRPC, Network: ""}} {
		t.Run(key.String(), func(t *testing.T) {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
			snap, err := res.Snapshot("v1")
			if err != nil {
				t.Fatal(err)
			}
			if key.Kind != ProxySidecar { // sidecar routes are fetched by RDS name; checked below
				if err := snap.Consistent(); err != nil {
					t.Fatalf("snapshot not consistent: %v", err)
				}
			}
			clusters := res[resource.ClusterType]
			if clusterNameOf(clusters[0]) != "outbound|8080||echo.demo.svc.cluster.local" {
				t.Fatalf("clusters: %v", clusters)
			}
			if key.Kind == ProxyGRPC && clusters[0].(*cluster.Cluster).GetTransportSocket() == nil {
				t.Fatal("a service with mTLS-ready endpoints must get an mTLS transport socket for proxyless clients")
			}
			if key.Kind == ProxySidecar {
				// Envoy takes its certificate and roots over SDS from its agent.
				var up tlsv3.UpstreamTlsContext
				if err := clusters[0].(*cluster.Cluster).GetTransportSocket().GetTypedConfig().UnmarshalTo(&up); err != nil {
					t.Fatalf("sidecar cluster without an mTLS transport socket: %v", err)
				}
				ctc := up.GetCommonTlsContext()
				if up.Sni != "outbound_.8080_._.echo.demo.svc.cluster.local" ||
					ctc.GetTlsCertificateSdsSecretConfigs()[0].GetName() != "default" ||
					ctc.GetValidationContextSdsSecretConfig().GetName() != "ROOTCA" ||
					ctc.GetValidationContextSdsSecretConfig().GetSdsConfig().GetApiConfigSource().GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName() != SDSCluster {
					t.Fatalf("sidecar upstream TLS: %v", &up)
				}
			}
			cla := res[resource.EndpointType][0].(*endpoint.ClusterLoadAssignment)
			for _, loc := range cla.Endpoints {
				if loc.GetLoadBalancingWeight().GetValue() == 0 {
					t.Fatalf("locality %v without weight (proxyless gRPC would drop it)", loc.Locality)
				}
			}
			switch key.Kind {
			case ProxyGRPC:
				l := res[resource.ListenerType][0].(*listener.Listener)
				if l.Name != "echo.demo.svc.cluster.local:8080" || l.ApiListener == nil {
					t.Fatalf("gRPC listener: %v", l)
				}
				var m hcm.HttpConnectionManager
				if err := l.ApiListener.ApiListener.UnmarshalTo(&m); err != nil {
					t.Fatal(err)
				}
				if n := len(m.HttpFilters); n == 0 || m.HttpFilters[n-1].Name != "envoy.filters.http.router" {
					t.Fatalf("gRPC listener needs the router filter last: %v", m.HttpFilters)
				}
				if key.Network == "n1" && len(cla.Endpoints) != 2 {
					t.Fatalf("n1 should see its endpoint and n2's gateway in two localities: %v", cla.Endpoints)
				}
			case ProxySidecar:
				if len(res[resource.RouteType]) != 1 || len(res[resource.ListenerType]) != 1 {
					t.Fatalf("sidecar routes/listeners: %v / %v", res[resource.RouteType], res[resource.ListenerType])
				}
			case ProxyGateway:
				if len(cla.Endpoints) != 1 || len(cla.Endpoints[0].LbEndpoints) != 1 {
					t.Fatalf("gateway view: %v", cla)
				}
				// The Envoy gateway: TLS inspector, a filter chain per SNI to its sni-dnat cluster.
				ls := res[resource.ListenerType]
				if len(ls) != 1 {
					t.Fatalf("gateway listeners: %v", ls)
				}
				l := ls[0].(*listener.Listener)
				if l.ListenerFilters[0].Name != "envoy.filters.listener.tls_inspector" || len(l.FilterChains) != 1 ||
					l.FilterChains[0].FilterChainMatch.ServerNames[0] != "outbound_.8080_._.echo.demo.svc.cluster.local" {
					t.Fatalf("gateway listener: %v", l)
				}
				names := map[string]bool{}
				for _, c := range res[resource.ClusterType] {
					names[clusterNameOf(c)] = true
				}
				if !names["outbound_.8080_._.echo.demo.svc.cluster.local"] {
					t.Fatalf("no sni-dnat cluster: %v", names)
				}
				if err := snap.Consistent(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

func clusterNameOf(r any) string {
	type named interface{ GetName() string }
	return r.(named).GetName()
}

// TestValidateOpensTypedConfigs checks that Validate finds an error hidden in a filter's
// typed config, which the listener's own ValidateAll does not look into.
func TestValidateOpensTypedConfigs(t *testing.T) {
	l, err := gatewayListener([]string{"outbound_.80_._.a.b.svc.cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	if err := (Resources{resource.ListenerType: {l}}).Validate(); err != nil {
		t.Fatal(err)
	}
	bad, _ := anypb.New(&tcpproxy.TcpProxy{}) // no stat_prefix, no cluster: invalid
	l.FilterChains[0].Filters[0].ConfigType = &listener.Filter_TypedConfig{TypedConfig: bad}
	if err := l.ValidateAll(); err != nil {
		t.Fatalf("precondition: the listener alone validates (%v)", err)
	}
	if err := (Resources{resource.ListenerType: {l}}).Validate(); err == nil {
		t.Fatal("an invalid TcpProxy inside a filter chain passed Validate")
	}
}

// TestRegistryMergeOrder: merged endpoints are sorted by cluster then address whether the
// shards hand them over in order (the usual case, where the merge skips the sort) or not
// (a shard holding another cluster's endpoints, or unsorted ones), with every endpoint
// kept.
func TestRegistryMergeOrder(t *testing.T) {
	const h = mesh.Hostname("echo.demo.svc.cluster.local")
	svc := &Service{Hostname: h, Key: mesh.ServiceKey{Namespace: "demo", Name: "echo"},
		Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
	for _, tc := range []struct {
		name   string
		shards map[mesh.ClusterID][]mesh.Endpoint
	}{
		{"in order", map[mesh.ClusterID][]mesh.Endpoint{
			"c1": {ep("10.1.0.1", "c1", "", true, "a"), ep("10.1.0.2", "c1", "", true, "a")},
			"c2": {ep("10.2.0.1", "c2", "", true, "a"), ep("10.2.0.9", "c2", "", true, "a")},
		}},
		{"unsorted within a shard", map[mesh.ClusterID][]mesh.Endpoint{
			"c1": {ep("10.1.0.9", "c1", "", true, "a"), ep("10.1.0.2", "c1", "", true, "a")},
			"c2": {ep("10.2.0.1", "c2", "", true, "a")},
		}},
		{"another cluster's endpoints in a shard", map[mesh.ClusterID][]mesh.Endpoint{
			"c1": {ep("10.3.0.1", "c3", "", true, "a")},
			"c2": {ep("10.2.0.1", "c2", "", true, "a")},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := NewRegistry()
			want := 0
			for c, eps := range tc.shards {
				r.UpdateService(ShardKey{SourceKubernetes, c}, h, svc, eps)
				want += len(eps)
			}
			got := r.View().Service(h).Endpoints
			if len(got) != want {
				t.Fatalf("%d endpoints merged, want %d", len(got), want)
			}
			for i := 1; i < len(got); i++ {
				a, b := got[i-1], got[i]
				if a.Cluster > b.Cluster || (a.Cluster == b.Cluster && a.Address.Compare(b.Address) > 0) {
					t.Fatalf("not sorted at %d: %v %v then %v %v", i, a.Cluster, a.Address, b.Cluster, b.Address)
				}
			}
		})
	}
}
