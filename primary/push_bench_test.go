package primary

import (
	"context"
	"fmt"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Reproduce with:
//
//	go test ./primary -run '^$' -bench 'Push1000' -count 5
//
// One push of a changed view to 1,000 state-of-the-world watchers, each subscribed to one
// service's endpoints (as proxyless gRPC clients are), counting the work until every
// watcher's response is ready to send (GetDiscoveryResponse). The baseline is
// go-control-plane's SnapshotCache (non-ADS mode, one snapshot shared by every node),
// which marshals each response's resources per watcher; the view cache marshals each
// changed resource once per view.

const pushWatchers = 1000

func pushView(b *testing.B, weight uint32) (*View, Resources) {
	r := NewRegistry()
	fillRegistry(r, 10, 100, 10)
	sd := r.Shard(ShardKey{SourceKubernetes, "c000"})
	for h, eps := range sd.Endpoints { // change every service, as a full resync does
		eps = append([]mesh.Endpoint(nil), eps...)
		eps[0].Weight = weight
		r.UpdateService(ShardKey{SourceKubernetes, "c000"}, h, sd.Services[h], eps)
	}
	v := r.View()
	res, err := BuildResources(v, ViewKey{Kind: ProxyGRPC})
	if err != nil {
		b.Fatal(err)
	}
	return v, res
}

func watcherNames(i int) []string {
	return []string{mesh.OutboundName{Port: 8080, Host: mesh.ServiceKey{Namespace: "ns", Name: fmt.Sprintf("svc%03d", i%100)}.Hostname("")}.ClusterName()}
}

func BenchmarkPush1000Watchers(b *testing.B) {
	_, res1 := pushView(b, 2)
	_, res2 := pushView(b, 3)
	node := grpcNode("sidecar~bench")
	b.Run("viewcache", func(b *testing.B) {
		c := newViewCache(nil)
		key := ViewKey{Kind: ProxyGRPC}
		c.SetView(key, res1)
		for i := 0; b.Loop(); i++ {
			chans := make([]chan cache.Response, pushWatchers)
			b.StopTimer()
			for w := range chans {
				chans[w] = make(chan cache.Response, 1)
				names := watcherNames(w)
				req := &discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: names, VersionInfo: "stale"}
				// Open the watch at the version the watcher has, so the push answers it.
				first := make(chan cache.Response, 1)
				c.CreateWatch(req, stream.NewSotwSubscription(names, false), first)
				r := <-first
				req.VersionInfo = r.GetResponseVersion()
				c.CreateWatch(req, stream.NewSotwSubscription(names, false), chans[w])
			}
			next := res2
			if i%2 == 1 {
				next = res1
			}
			b.StartTimer()
			c.SetView(key, next)
			for _, ch := range chans {
				if _, err := (<-ch).GetDiscoveryResponse(); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("snapshotcache", func(b *testing.B) {
		c := cache.NewSnapshotCache(false, cache.IDHash{}, nil)
		snap1, _ := res1.Snapshot("1")
		snap2, _ := res2.Snapshot("2")
		c.SetSnapshot(context.Background(), "sidecar~bench", snap1)
		for i := 0; b.Loop(); i++ {
			chans := make([]chan cache.Response, pushWatchers)
			b.StopTimer()
			version, next := "1", snap2
			if i%2 == 1 {
				version, next = "2", snap1
			}
			for w := range chans {
				chans[w] = make(chan cache.Response, 1)
				names := watcherNames(w)
				req := &discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: names, VersionInfo: version}
				c.CreateWatch(req, stream.NewSotwSubscription(names, false), chans[w])
			}
			b.StartTimer()
			c.SetSnapshot(context.Background(), "sidecar~bench", next)
			for _, ch := range chans {
				if _, err := (<-ch).GetDiscoveryResponse(); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}
