package primary

import (
	"net/netip"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func grpcNode(id string) *core.Node {
	meta, _ := structpb.NewStruct(map[string]any{MetaGenerator: "grpc"})
	return &core.Node{Id: id, Metadata: meta}
}

// twoServices builds the grpc view of a registry with services a and b.
func twoServices(t *testing.T, weightA uint32) Resources {
	t.Helper()
	r := NewRegistry()
	for i, name := range []string{"a", "b"} {
		k := mesh.ServiceKey{Namespace: "ns", Name: name}
		e := ep("10.0.0."+string(rune('1'+i)), "c1", "", false, "z")
		if name == "a" {
			e.Weight = weightA
		}
		r.UpdateService(ShardKey{SourceKubernetes, "c1"}, k.Hostname(""), &Service{Hostname: k.Hostname(""), Key: k,
			Ports: []ServicePort{{Name: "grpc", Port: 8080}}}, []mesh.Endpoint{e})
	}
	res, err := BuildResources(r.View(), ViewKey{Kind: ProxyGRPC})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

var (
	edsA = mesh.OutboundName{Port: 8080, Host: "a.ns.svc.cluster.local"}.ClusterName()
	edsB = mesh.OutboundName{Port: 8080, Host: "b.ns.svc.cluster.local"}.ClusterName()
)

// TestViewCacheSotw is the regression test for a proxyless client that subscribes to one
// service's endpoints in a mesh of many (go-control-plane's SnapshotCache in ADS mode never
// answers it), and checks that unrelated changes send it nothing.
func TestViewCacheSotw(t *testing.T) {
	var announced []ViewKey
	c := newViewCache(func(k ViewKey) { announced = append(announced, k) })
	ch := make(chan cache.Response, 8)
	req := &discovery.DiscoveryRequest{Node: grpcNode("sidecar~1"), TypeUrl: resource.EndpointType, ResourceNames: []string{edsA}}
	sub := stream.NewSotwSubscription(req.ResourceNames, false)
	cancel, err := c.CreateWatch(req, sub, ch)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	if len(announced) != 1 || announced[0] != (ViewKey{Kind: ProxyGRPC}) {
		t.Fatalf("view not announced: %v", announced)
	}
	if err := c.SetView(ViewKey{Kind: ProxyGRPC}, twoServices(t, 1)); err != nil {
		t.Fatal(err)
	}
	first := <-ch
	resp, _ := first.GetDiscoveryResponse()
	if len(resp.Resources) != 1 {
		t.Fatalf("want only the subscribed resource, got %d", len(resp.Resources))
	}
	// The ACK: the same request at the returned version, no new answer for an equal view.
	req2 := &discovery.DiscoveryRequest{Node: req.Node, TypeUrl: req.TypeUrl, ResourceNames: req.ResourceNames, VersionInfo: resp.VersionInfo}
	if _, err := c.CreateWatch(req2, sub, ch); err != nil {
		t.Fatal(err)
	}
	if err := c.SetView(ViewKey{Kind: ProxyGRPC}, twoServices(t, 1)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		t.Fatalf("an unchanged resource was sent again: %v", r)
	default:
	}
	if err := c.SetView(ViewKey{Kind: ProxyGRPC}, twoServices(t, 7)); err != nil {
		t.Fatal(err)
	}
	second, _ := (<-ch).GetDiscoveryResponse()
	if second.VersionInfo == resp.VersionInfo || len(second.Resources) != 1 {
		t.Fatalf("changed resource: %v", second)
	}
	// Bytes are shared between responses, not re-marshalled.
	other := make(chan cache.Response, 1)
	if _, err := c.CreateWatch(&discovery.DiscoveryRequest{Node: grpcNode("sidecar~2"), TypeUrl: resource.EndpointType, ResourceNames: []string{edsA}},
		stream.NewSotwSubscription([]string{edsA}, false), other); err != nil {
		t.Fatal(err)
	}
	third, _ := (<-other).GetDiscoveryResponse()
	if &third.Resources[0].Value[0] != &second.Resources[0].Value[0] {
		t.Fatal("two proxies got separately marshalled copies of one resource")
	}
	if _, err := c.CreateWatch(&discovery.DiscoveryRequest{Node: &core.Node{}, TypeUrl: resource.EndpointType}, sub, ch); err == nil {
		t.Fatal("a node without ID was accepted")
	}
}

func TestViewCacheDelta(t *testing.T) {
	c := newViewCache(nil)
	key := ViewKey{Kind: ProxyGRPC}
	if err := c.SetView(key, twoServices(t, 1)); err != nil {
		t.Fatal(err)
	}
	ch := make(chan cache.DeltaResponse, 8)
	req := &discovery.DeltaDiscoveryRequest{Node: grpcNode("sidecar~d"), TypeUrl: resource.ClusterType}
	sub := stream.NewDeltaSubscription(nil, nil, nil, true)
	if _, err := c.CreateDeltaWatch(req, sub, ch); err != nil {
		t.Fatal(err)
	}
	resp, _ := (<-ch).GetDeltaDiscoveryResponse()
	if len(resp.Resources) != 2 {
		t.Fatalf("wildcard delta: want both clusters, got %v", resp.Resources)
	}
	returned := map[string]string{}
	for _, r := range resp.Resources {
		returned[r.Name] = r.Version
	}
	sub2 := stream.NewDeltaSubscription(nil, nil, returned, true)
	if _, err := c.CreateDeltaWatch(&discovery.DeltaDiscoveryRequest{Node: req.Node, TypeUrl: resource.ClusterType, ResponseNonce: "1"}, sub2, ch); err != nil {
		t.Fatal(err)
	}
	// Service b goes away: the client is told to remove its cluster, nothing else.
	r := NewRegistry()
	k := mesh.ServiceKey{Namespace: "ns", Name: "a"}
	r.UpdateService(ShardKey{SourceKubernetes, "c1"}, k.Hostname(""), &Service{Hostname: k.Hostname(""), Key: k, Ports: []ServicePort{{Name: "grpc", Port: 8080}}},
		[]mesh.Endpoint{{Address: netip.MustParseAddr("10.0.0.1"), Cluster: "c1", Ports: []mesh.Port{{Name: "grpc", Number: 8080}}}})
	res, _ := BuildResources(r.View(), key)
	if err := c.SetView(key, res); err != nil {
		t.Fatal(err)
	}
	upd, _ := (<-ch).GetDeltaDiscoveryResponse()
	if len(upd.Resources) != 0 || len(upd.RemovedResources) != 1 || upd.RemovedResources[0] != edsB {
		t.Fatalf("delta update: %v", upd)
	}
}
