package primary_test

import (
	"fmt"
	"net/netip"

	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// A registry with one gRPC service in one cluster, built for the proxyless gRPC clients of
// network-1: a cluster, its endpoints, and the api_listener a client dialling
// xds:///echo.demo.svc.cluster.local:8080 asks for.
func ExampleBuilder_Build() {
	reg := primary.NewRegistry()
	key := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	host := key.Hostname("")
	reg.UpdateService(primary.ShardKey{Source: primary.SourceKubernetes, Cluster: "cluster-1"}, host,
		&primary.Service{Hostname: host, Key: key, Ports: []primary.ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}},
		[]mesh.Endpoint{{
			Address: netip.MustParseAddr("10.1.0.7"), Cluster: "cluster-1", Network: "network-1", Health: mesh.HealthHealthy,
			Ports: []mesh.Port{{Name: "grpc", Number: 8080, Protocol: mesh.ProtocolGRPC}},
		}})

	b := primary.NewBuilder()
	res, err := b.Build(reg.View(), primary.ViewKey{Kind: primary.ProxyGRPC, Network: "network-1"})
	if err != nil {
		panic(err)
	}
	for _, typ := range []resource.Type{resource.ClusterType, resource.EndpointType, resource.ListenerType} {
		for _, r := range res[typ] {
			fmt.Println(cache.GetResourceName(r))
		}
	}
	// Output:
	// outbound|8080||echo.demo.svc.cluster.local
	// outbound|8080||echo.demo.svc.cluster.local
	// echo.demo.svc.cluster.local:8080
}
