package primary

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Rewrite the golden files after an intended change to the builder with
//
//	go test ./primary -short -run Golden -update
//
// (-short skips the package's shared API servers, which this test does not need), then
// read the diff of testdata/ before committing it.
var update = flag.Bool("update", false, "rewrite primary/testdata/*.golden from the builder's output")

// goldenView is a small mesh that exercises every branch of the builder: a gRPC service
// with mTLS-ready endpoints on two networks (split horizon through n2's gateway, mTLS
// transport sockets, SNI), and a plain HTTP service without mTLS (no transport socket, a
// sidecar route on its own port).
func goldenView() *View {
	r := NewRegistry()
	echo := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	web := mesh.ServiceKey{Namespace: "demo", Name: "web"}
	svc := func(k mesh.ServiceKey, vip string, p ServicePort) *Service {
		return &Service{Hostname: k.Hostname(""), Key: k, VIP: netip.MustParseAddr(vip), Ports: []ServicePort{p}}
	}
	grpcPort := ServicePort{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}
	httpPort := ServicePort{Name: "http", Port: 80, Protocol: mesh.ProtocolHTTP}
	c1, c2 := ShardKey{SourceKubernetes, "c1"}, ShardKey{SourceKubernetes, "c2"}
	r.UpdateService(c1, echo.Hostname(""), svc(echo, "10.96.0.10", grpcPort), []mesh.Endpoint{ep("10.1.0.1", "c1", "n1", true, "a")})
	r.UpdateService(c2, echo.Hostname(""), svc(echo, "10.96.0.20", grpcPort), []mesh.Endpoint{ep("10.2.0.1", "c2", "n2", true, "b")})
	webEP := mesh.Endpoint{
		Address: netip.MustParseAddr("10.1.0.2"), Cluster: "c1", Network: "n1", Health: mesh.HealthHealthy,
		Ports: []mesh.Port{{Name: "http", Number: 8000, Protocol: mesh.ProtocolHTTP}}, Locality: mesh.Locality{Region: "r", Zone: "a"},
	}
	r.UpdateService(c1, web.Hostname(""), svc(web, "10.96.0.11", httpPort), []mesh.Endpoint{webEP})
	r.UpdateGateways(c2, []Gateway{gw("n2", "192.0.2.2")})
	return r.View()
}

// TestBuilderGolden compares the builder's output for each proxy kind with
// testdata/<kind>.golden. gateway.golden is what both kinds of gateway receive, since
// both identify as "router~" and get the same view: an Envoy gateway uses its listener
// and sni-dnat clusters (named by SNI), Isthmus's eastwest gateway the outbound| clusters
// and their endpoints.
func TestBuilderGolden(t *testing.T) {
	v := goldenView()
	for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1"}, {Kind: ProxyGateway, Network: "n2"}} {
		t.Run(string(key.Kind), func(t *testing.T) {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := renderGolden(key, res)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", string(key.Kind)+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)); d != "" {
				t.Errorf("builder output for %s differs from %s (-want +got); if the change is intended, rerun with -update:\n%s", key, path, d)
			}
		})
	}
}

// renderGolden prints res as text that diffs well: resources by type in xDS order, each
// under a "# <type> <name>" header as indented JSON. protojson's own spacing is
// deliberately unstable across builds, so its output is compacted and re-indented by
// encoding/json; field order is the proto's and map keys are sorted, so the text depends
// only on the resources.
func renderGolden(key ViewKey, res Resources) ([]byte, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# view %s\n", key)
	for _, typ := range []resource.Type{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType} {
		for _, r := range res[typ] {
			js, err := protojson.Marshal(r.(proto.Message))
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", typ, cache.GetResourceName(r), err)
			}
			var compact, indented bytes.Buffer
			if err := json.Compact(&compact, js); err != nil {
				return nil, err
			}
			if err := json.Indent(&indented, compact.Bytes(), "", "  "); err != nil {
				return nil, err
			}
			fmt.Fprintf(&b, "\n# %s %s\n%s\n", shortType(typ), cache.GetResourceName(r), indented.Bytes())
		}
	}
	return b.Bytes(), nil
}

func shortType(typ resource.Type) string {
	switch typ {
	case resource.ClusterType:
		return "cluster"
	case resource.EndpointType:
		return "endpoints"
	case resource.ListenerType:
		return "listener"
	case resource.RouteType:
		return "route"
	}
	return typ
}
