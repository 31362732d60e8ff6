package primary

import (
	"fmt"
	"net/netip"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Reproduce with:
//
//	go test ./primary -run '^$' -bench 'SidecarViewSize' -count 3
//
// The size of one proxyless client's view (every resource marshalled, all four types)
// and the time to build and marshal it, at 100 services in 10 namespaces on 3 clusters
// with 10 endpoints each per cluster: without a Sidecar, and with a Sidecar scoping the
// client's namespace to itself ("./*").

// scopeBenchView fills 3 clusters with 100 services over 10 namespaces, plus the Sidecar
// doc (if any) in namespace ns0.
func scopeBenchView(b *testing.B, sidecar string) *View {
	r := NewRegistry()
	for c := range 3 {
		id := mesh.ClusterID(fmt.Sprintf("c%d", c))
		data := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
		for s := range 100 {
			key := mesh.ServiceKey{Namespace: fmt.Sprintf("ns%d", s%10), Name: fmt.Sprintf("svc%03d", s)}
			h := key.Hostname("")
			data.Services[h] = &Service{Hostname: h, Key: key, Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
			eps := make([]mesh.Endpoint, 10)
			for e := range eps {
				eps[e] = mesh.Endpoint{
					Address: netip.AddrFrom4([4]byte{10, byte(c), byte(s), byte(e + 1)}), Cluster: id, Network: "n1", Health: mesh.HealthHealthy,
					Ports: []mesh.Port{{Name: "grpc", Number: 8080}}, Locality: mesh.Locality{Region: "r", Zone: string(id)},
				}
			}
			data.Endpoints[h] = eps
		}
		r.ReplaceShard(ShardKey{SourceKubernetes, id}, data)
	}
	tc := newTrafficConfig("cluster.local", nil, nil)
	if sidecar != "" {
		tc.Sidecars = append(tc.Sidecars, mustSidecar(b, sidecar))
	}
	r.SetTrafficConfig(tc)
	return r.View()
}

func BenchmarkSidecarViewSize(b *testing.B) {
	for _, c := range []struct{ name, sidecar string }{
		{"unscoped", ""},
		{"sidecar=./*", `{metadata: {name: default, namespace: ns0}, spec: {egress: [{hosts: ["./*"]}]}}`},
	} {
		b.Run(c.name, func(b *testing.B) {
			v := scopeBenchView(b, c.sidecar)
			key := ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "ns0"}
			var size, count int
			for b.Loop() {
				res, err := NewBuilder().Build(v, key) // a cold build: what a new view costs
				if err != nil {
					b.Fatal(err)
				}
				size, count = 0, 0
				for _, list := range res {
					for _, r := range list {
						m, err := proto.Marshal(r.(proto.Message))
						if err != nil {
							b.Fatal(err)
						}
						size += len(m)
						count++
					}
				}
			}
			b.ReportMetric(float64(size), "view-bytes")
			b.ReportMetric(float64(count), "resources")
		})
	}
}
