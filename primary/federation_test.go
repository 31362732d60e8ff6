package primary

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// TestGatewayExportAliases checks the gateway view of an exporting mesh: an exported port
// is routed under its federation name with the local service's endpoints on the gateway's
// network, a port or service that is not exported is not, an import from a peer is never
// re-exported, other proxies see no alias, and unexporting removes the alias.
func TestGatewayExportAliases(t *testing.T) {
	r := NewRegistry()
	echo := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	r.UpdateService(ShardKey{SourceKubernetes, "c2"}, "echo.demo.svc.cluster.local", &Service{Hostname: "echo.demo.svc.cluster.local", Key: echo,
		Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}, {Name: "admin", Port: 9090, Protocol: mesh.ProtocolTCP}}},
		[]mesh.Endpoint{ep("10.2.0.1", "c2", "n2", true, "b"), ep("10.1.0.1", "c1", "n1", true, "a")})
	// The same key imported from peer mesh-b: it must not be aliased as mesh-a's.
	r.UpdateService(ShardKey{"federation", "mesh-b"}, "echo.demo.svc.mesh-b.isthmus", &Service{Hostname: "echo.demo.svc.mesh-b.isthmus", Key: echo,
		Ports: []ServicePort{{Name: "grpc", Port: 8080}}}, []mesh.Endpoint{ep("192.0.2.9", "mesh-b", "federation-mesh-b", true, "")})
	r.SetFederationExports(FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{echo: {8080}, {Namespace: "demo", Name: "gone"}: {80}}})

	names := func(key ViewKey) ([]string, map[string][]string) {
		res, err := NewBuilder().Build(r.View(), key)
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Validate(); err != nil {
			t.Fatal(err)
		}
		var cs []string
		for _, c := range res[resource.ClusterType] {
			cs = append(cs, clusterNameOf(c))
		}
		eps := map[string][]string{}
		for _, e := range res[resource.EndpointType] {
			cla := e.(*endpoint.ClusterLoadAssignment)
			for _, loc := range cla.GetEndpoints() {
				for _, le := range loc.GetLbEndpoints() {
					eps[cla.GetClusterName()] = append(eps[cla.GetClusterName()], le.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
				}
			}
		}
		return cs, eps
	}
	gwKey := ViewKey{Kind: ProxyGateway, Network: "n2"}
	cs, eps := names(gwKey)
	var aliases []string
	for _, c := range cs {
		if strings.HasSuffix(c, ".mesh-a.isthmus") {
			aliases = append(aliases, c)
		}
	}
	slices.Sort(aliases)
	want := []string{"outbound_.8080_._.echo.demo.svc.mesh-a.isthmus", "outbound|8080||echo.demo.svc.mesh-a.isthmus"}
	if !slices.Equal(aliases, want) {
		t.Fatalf("gateway aliases %v; want %v", aliases, want)
	}
	for _, a := range want {
		if got := eps[a]; !slices.Equal(got, []string{"10.2.0.1"}) {
			t.Errorf("%s endpoints %v; want the local service's on n2 only", a, got)
		}
	}
	if cs, _ := names(ViewKey{Kind: ProxySidecar, Network: "n1"}); slices.ContainsFunc(cs, func(c string) bool { return strings.Contains(c, "mesh-a.isthmus") }) {
		t.Errorf("a sidecar's view has federation aliases: %v", cs)
	}
	b, err := json.Marshal(r.View().Exports)
	if err != nil || string(b) != `{"mesh":"mesh-a","services":{"demo/echo":[8080],"demo/gone":[80]}}` {
		t.Errorf("exports JSON %s, %v", b, err)
	}

	r.SetFederationExports(FederationExports{Mesh: "mesh-a"})
	if cs, _ := names(gwKey); slices.ContainsFunc(cs, func(c string) bool { return strings.Contains(c, "mesh-a.isthmus") }) {
		t.Errorf("aliases left after unexport: %v", cs)
	}
}

// TestFederationDenyPeers: with live peers, every xDS-enabled server denies the callers
// of each peer's trust domain unless its service is exported to that peer (exported to
// mesh-b, not to mesh-c: mesh-c's callers denied, mesh-b's not); the mesh's own callers
// are never concerned; the deny merges with the user's DENY policies; changing the
// export set rebuilds the listeners; without peers nothing is added.
func TestFederationDenyPeers(t *testing.T) {
	echo := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	denyOf := func(t *testing.T, r *Registry, b *Builder) []string {
		t.Helper()
		got := inbound(t, b, r.View(), ViewKey{Kind: ProxyGRPC, Network: "n1"})
		l := got[InboundListenerName(netip.MustParseAddrPort("10.1.0.1:8080"))]
		if l == nil {
			t.Fatal("no inbound listener for echo")
		}
		for _, f := range hcmOf(t, l.FilterChains[0]).HttpFilters {
			if f.Name != rbacDenyFilter {
				continue
			}
			rb := &rbacfilter.RBAC{}
			if err := f.GetTypedConfig().UnmarshalTo(rb); err != nil {
				t.Fatal(err)
			}
			var out []string
			for name, p := range rb.GetRules().GetPolicies() {
				if strings.HasPrefix(name, FederationDenyPolicyPrefix) {
					name += " " + p.GetPrincipals()[0].GetAuthenticated().GetPrincipalName().GetPrefix()
				}
				out = append(out, name)
			}
			slices.Sort(out)
			return out
		}
		return nil
	}
	r := securityRegistry()
	r.SetSecurityConfig(decode(t, authzDenyOps))
	b := NewBuilder()
	userDeny := denyOf(t, r, b)
	if len(userDeny) == 0 {
		t.Fatal("the user's DENY policy is not in force")
	}
	peers := map[mesh.MeshID]mesh.TrustDomain{"mesh-b": "b.example", "mesh-c": "c.example"}
	r.SetFederationExports(FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{echo: {8080}},
		Consumers: map[mesh.ServiceKey][]mesh.MeshID{echo: {"mesh-b"}}, Peers: peers})
	want := append(slices.Clone(userDeny), "isthmus-federation/demo/echo/not-exported-to/mesh-c spiffe://c.example/")
	slices.Sort(want)
	if got := denyOf(t, r, b); !slices.Equal(got, want) {
		t.Fatalf("deny policies %v; want %v", got, want)
	}
	// Not exported at all: both peers denied.
	r.SetFederationExports(FederationExports{Mesh: "mesh-a", Peers: peers})
	want = append(slices.Clone(userDeny), "isthmus-federation/demo/echo/not-exported-to/mesh-b spiffe://b.example/",
		"isthmus-federation/demo/echo/not-exported-to/mesh-c spiffe://c.example/")
	slices.Sort(want)
	if got := denyOf(t, r, b); !slices.Equal(got, want) {
		t.Fatalf("deny policies %v; want %v", got, want)
	}
	// Exported to both: only the user's policies.
	r.SetFederationExports(FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{echo: {8080}},
		Consumers: map[mesh.ServiceKey][]mesh.MeshID{echo: {"mesh-b", "mesh-c"}}, Peers: peers})
	if got := denyOf(t, r, b); !slices.Equal(got, userDeny) {
		t.Fatalf("deny policies %v; want the user's %v", got, userDeny)
	}
	// No user DENY policy and no peers: no deny filter at all.
	r.SetSecurityConfig(decode(t))
	r.SetFederationExports(FederationExports{Mesh: "mesh-a"})
	if got := denyOf(t, r, b); got != nil {
		t.Fatalf("deny policies %v without peers or policies", got)
	}
	// A peer alone brings a deny filter of its own.
	r.SetFederationExports(FederationExports{Mesh: "mesh-a", Peers: map[mesh.MeshID]mesh.TrustDomain{"mesh-c": "c.example"}})
	if got := denyOf(t, r, b); !slices.Equal(got, []string{"isthmus-federation/demo/echo/not-exported-to/mesh-c spiffe://c.example/"}) {
		t.Fatalf("deny policies %v", got)
	}
}
