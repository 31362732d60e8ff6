package primary

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
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
