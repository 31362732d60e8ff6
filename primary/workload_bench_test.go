package primary

import (
	"fmt"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
)

// Reproduce with:
//
//	go test ./primary -run '^$' -bench 'ViewCacheRekey' -count 3
//
// What re-keying costs a push while some Sidecar with workloadSelector exists: every
// parked watch's key derived again (ProxyFromNode, then the selector match against the
// pod's labels; a map stands in for the watcher's pod cache), with nothing moving: N
// watches in the selector Sidecar's namespace (half of them selected), and N in another
// namespace, which are not looked at. Without selector Sidecars the push skips it.
func BenchmarkViewCacheRekey(b *testing.B) {
	for _, c := range []struct {
		n  int
		ns string
	}{{1000, "demo"}, {10000, "demo"}, {10000, "shop"}} {
		n, ns := c.n, c.ns
		b.Run(fmt.Sprintf("watches=%d/ns=%s", n, ns), func(b *testing.B) {
			r := scopeRegistry(b)
			setSidecars(b, r, `{metadata: {name: narrow, namespace: demo}, spec: {workloadSelector: {labels: {app: narrow}}, egress: [{hosts: ["./*"]}]}}`)
			sp := NewBuilder().trafficPlanFor(r.View()).sidecars
			pods := map[string]map[string]string{}
			c := newViewCache(nil)
			c.keyOf = func(node *core.Node) (ViewKey, error) {
				k, err := viewKeyOf(node)
				if err == nil && sp.hasSelectors(k.Namespace) {
					k.Workload = sp.workloadFor(k.Namespace, pods[node.GetId()])
				}
				return k, err
			}
			for i := range n {
				id := fmt.Sprintf("sidecar~10.0.%d.%d~pod-%d.%s~%s.svc.cluster.local", i/250, i%250, i, ns, ns)
				pods[id] = map[string]string{"app": []string{"narrow", "web"}[i%2]}
				req := &discovery.DiscoveryRequest{Node: grpcNode(id), TypeUrl: resource.ClusterType, VersionInfo: "x"}
				if _, err := c.CreateWatch(req, stream.NewSotwSubscription(nil, false), make(chan cache.Response, 1)); err != nil {
					b.Fatal(err)
				}
			}
			affected := func(k ViewKey) bool { return k.Workload != "" || sp.hasSelectors(k.Namespace) } // as push
			c.rekey(affected)                                                                            // the first pass moves the selected half
			b.ResetTimer()
			for b.Loop() {
				if moved := c.rekey(affected); moved != 0 {
					b.Fatalf("moved %d", moved)
				}
			}
		})
	}
}
