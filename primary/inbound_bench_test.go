package primary

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// BenchmarkInboundPush measures one proxyless view's Build after one service of 100 (10
// xDS-enabled pods each, two AuthorizationPolicies and a PeerAuthentication in force)
// changed: the memo rebuilds only that service's 10 inbound Listeners. It reports the
// Listeners in the view.
func BenchmarkInboundPush(b *testing.B) {
	r := NewRegistry()
	shard := ShardKey{SourceKubernetes, "c1"}
	update := func(i, gen int) {
		key := mesh.ServiceKey{Namespace: "demo", Name: fmt.Sprintf("svc-%d", i)}
		svc := &Service{Hostname: key.Hostname(""), Key: key, Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
		var eps []mesh.Endpoint
		for j := range 10 {
			e := ep(netip.AddrFrom4([4]byte{10, byte(i), byte(gen), byte(j + 1)}).String(), "c1", "n1", true, "a")
			e.Labels = map[string]string{"app": "echo", LabelXDSServer: "true"}
			eps = append(eps, e)
		}
		r.UpdateService(shard, key.Hostname(""), svc, eps)
	}
	for i := range 100 {
		update(i, 0)
	}
	r.SetSecurityConfig(decode(b, authzAllowFrontend, authzDenyOps, peerStrictPlain))
	bl := NewBuilder()
	key := ViewKey{Kind: ProxyGRPC, Network: "n1"}
	if _, err := bl.Build(r.View(), key); err != nil {
		b.Fatal(err)
	}
	gen := 0
	var n int
	for b.Loop() {
		gen++
		update(gen%100, gen%250+1)
		res, err := bl.Build(r.View(), key)
		if err != nil {
			b.Fatal(err)
		}
		n = len(res["type.googleapis.com/envoy.config.listener.v3.Listener"])
	}
	b.ReportMetric(float64(n), "listeners")
}
