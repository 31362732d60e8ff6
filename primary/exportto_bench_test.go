package primary

import (
	"fmt"
	"net/netip"
	"testing"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Reproduce with:
//
//	go test ./primary -run '^$' -bench 'ExportToPush' -count 3
//
// The cost exportTo adds to a push: 100 services in 10 namespaces on 3 clusters (10
// endpoints each per cluster), one VirtualService per service, and one proxyless view per
// namespace (10 views) kept warm in one Builder. Each iteration changes one service's
// endpoints (a new registry version, so every plan is made again) and rebuilds the 10
// views. Cases: every VirtualService exported everywhere (one plan); 10 of them with
// exportTo "." overriding another namespace's route (11 plans); all 100 with exportTo "."
// (10 plans, each namespace seeing its own 10).
func BenchmarkExportToPush(b *testing.B) {
	for _, c := range []struct {
		name    string
		private func(s int) bool
	}{
		{"public", func(int) bool { return false }},
		{"private=10", func(s int) bool { return s >= 100 }},
		{"private=100", func(s int) bool { return s < 100 }},
	} {
		b.Run(c.name, func(b *testing.B) {
			r := NewRegistry()
			eps := func(c, s, gen int) []mesh.Endpoint {
				out := make([]mesh.Endpoint, 10)
				for e := range out {
					out[e] = mesh.Endpoint{
						Address: netip.AddrFrom4([4]byte{10, byte(c), byte(s), byte(e + 1 + gen%2*100)}), Cluster: mesh.ClusterID(fmt.Sprintf("c%d", c)), Network: "n1",
						Health: mesh.HealthHealthy, Ports: []mesh.Port{{Name: "grpc", Number: 8080}}, Locality: mesh.Locality{Region: "r", Zone: "z"},
					}
				}
				return out
			}
			svc := func(s int) *Service {
				key := mesh.ServiceKey{Namespace: fmt.Sprintf("ns%d", s%10), Name: fmt.Sprintf("svc%03d", s)}
				return &Service{Hostname: key.Hostname(""), Key: key, Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
			}
			for c := range 3 {
				for s := range 100 {
					r.UpdateService(ShardKey{SourceKubernetes, mesh.ClusterID(fmt.Sprintf("c%d", c))}, svc(s).Hostname, svc(s), eps(c, s, 0))
				}
			}
			var vss []*networkingv1.VirtualService
			vsFor := func(name, ns string, s int, private bool) *networkingv1.VirtualService {
				y := fmt.Sprintf("metadata: {name: %s, namespace: %s, resourceVersion: \"1\"}\nspec:\n  hosts: [%s]\n", name, ns, svc(s).Hostname)
				if private {
					y += "  exportTo: [\".\"]\n"
				}
				y += fmt.Sprintf("  http:\n  - timeout: 2s\n    route:\n    - destination: {host: %s}\n", svc(s).Hostname)
				return mustVS(b, y)
			}
			for s := range 100 {
				vss = append(vss, vsFor(fmt.Sprintf("vs%03d", s), svc(s).Key.Namespace, s, c.private(s)))
			}
			if c.name == "private=10" { // namespace k overrides the route of a service of namespace k+1
				for k := range 10 {
					vss = append(vss, vsFor(fmt.Sprintf("override%d", k), fmt.Sprintf("ns%d", k), (k+1)%10, true))
				}
			}
			r.SetTrafficConfig(newTrafficConfig("cluster.local", vss, nil))
			bld := NewBuilder()
			build := func() {
				v := r.View()
				for ns := range 10 {
					if _, err := bld.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: fmt.Sprintf("ns%d", ns)}); err != nil {
						b.Fatal(err)
					}
				}
			}
			build()
			gen := 0
			for b.Loop() {
				gen++
				r.UpdateService(ShardKey{SourceKubernetes, "c0"}, svc(gen%100).Hostname, svc(gen%100), eps(0, gen%100, gen))
				build()
			}
			b.ReportMetric(float64(len(bld.plans.bySig)), "plans")
			for _, st := range bld.plans.public.status {
				if !st.Applied {
					b.Fatalf("refused: %+v", st)
				}
			}
		})
	}
}
