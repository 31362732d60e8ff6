package primary

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Reproduce with:
//
//	go test ./primary -run '^$' -bench 'Scale' -benchtime 1x -timeout 30m
//
// In-process sources fill the registry with clusters × services × endpoints; ADS clients
// (raw SotW streams, as proxyless gRPC clients subscribe: one cluster's endpoints each)
// connect; then one endpoint changes at a time and the benchmark measures how long until
// every client has received the update.

func BenchmarkScale100x100x10With1000Clients(b *testing.B) { benchScale(b, 100, 100, 10, 1000, 20) }
func BenchmarkScale10x100x10With100Clients(b *testing.B)   { benchScale(b, 10, 100, 10, 100, 20) }

func fillRegistry(reg *Registry, clusters, services, perCluster int) {
	for c := range clusters {
		id := mesh.ClusterID(fmt.Sprintf("c%03d", c))
		data := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
		for s := range services {
			key := mesh.ServiceKey{Namespace: "ns", Name: fmt.Sprintf("svc%03d", s)}
			h := key.Hostname("")
			data.Services[h] = &Service{Hostname: h, Key: key, Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
			eps := make([]mesh.Endpoint, perCluster)
			for e := range eps {
				eps[e] = mesh.Endpoint{
					Address: netip.AddrFrom4([4]byte{10, byte(c), byte(s), byte(e + 1)}), Cluster: id, Health: mesh.HealthHealthy,
					Ports: []mesh.Port{{Name: "grpc", Number: 8080}}, Locality: mesh.Locality{Region: "r", Zone: string(id)},
				}
			}
			data.Endpoints[h] = eps
		}
		reg.ReplaceShard(ShardKey{SourceKubernetes, id}, data)
	}
}

func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

func benchScale(b *testing.B, clusters, services, perCluster, clients, changes int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p, err := New(Config{ClusterID: "local", LocalClient: fake.NewClientset(), Debounce: 10 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	before := heapInUse()
	fillRegistry(p.Registry(), clusters, services, perCluster)
	total := clusters * services * perCluster
	perEndpoint := float64(heapInUse()-before) / float64(total)

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	p.RegisterXDS(ctx, gs)
	go gs.Serve(lis)
	defer gs.Stop()
	go p.Run(ctx)

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	// Each client watches the endpoints of one service, spread over all services.
	type update struct {
		client int
		at     time.Time
		cla    *endpoint.ClusterLoadAssignment
	}
	updates := make(chan update, clients*4)
	meta, _ := structpb.NewStruct(map[string]any{MetaGenerator: "grpc", MetaClusterID: "local"})
	heapBeforeClients := heapInUse()
	var ready sync.WaitGroup
	for i := range clients {
		svc := fmt.Sprintf("svc%03d", i%services)
		name := mesh.OutboundName{Port: 8080, Host: mesh.ServiceKey{Namespace: "ns", Name: svc}.Hostname("")}.ClusterName()
		stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			b.Fatal(err)
		}
		ready.Add(1)
		go func() {
			node := &core.Node{Id: fmt.Sprintf("sidecar~10.255.0.1~client%d.ns~ns.svc.cluster.local", i), Metadata: meta}
			stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: []string{name}})
			first := true
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				at := time.Now()
				stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{name}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
				if first {
					first = false
					ready.Done()
					continue
				}
				var cla endpoint.ClusterLoadAssignment
				if len(resp.Resources) > 0 && resp.Resources[0].UnmarshalTo(&cla) == nil {
					updates <- update{client: i, at: at, cla: &cla}
				}
			}
		}()
	}
	ready.Wait()
	perProxy := float64(heapInUse()-heapBeforeClients) / float64(clients)

	// Change one endpoint of one service at a time; every client of that service must see
	// it. All clients get a push (SotW resends a view's changed resources to its watchers).
	var lat []time.Duration
	var pushes []time.Duration
	for n := range changes {
		svcIdx := n % services
		want := 0
		for i := range clients {
			if i%services == svcIdx {
				want++
			}
		}
		h := mesh.ServiceKey{Namespace: "ns", Name: fmt.Sprintf("svc%03d", svcIdx)}.Hostname("")
		shard := ShardKey{SourceKubernetes, "c000"}
		sd := p.Registry().Shard(shard)
		eps := slices.Clone(sd.Endpoints[h])
		eps[0].Weight = uint32(n + 2)
		start := time.Now()
		p.Registry().UpdateService(shard, h, sd.Services[h], eps)
		got := 0
		deadline := time.After(60 * time.Second)
		for got < want {
			select {
			case u := <-updates:
				for _, loc := range u.cla.Endpoints {
					for _, le := range loc.LbEndpoints {
						if le.GetLoadBalancingWeight().GetValue() == uint32(n+2) {
							got++
							lat = append(lat, u.at.Sub(start))
						}
					}
				}
			case <-deadline:
				b.Fatalf("change %d: %d of %d clients updated after 60 s", n, got, want)
			}
		}
		pushes = append(pushes, time.Since(start))
	}
	slices.Sort(lat)
	b.ReportMetric(ms(lat[len(lat)/2]), "ms-update-p50")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "ms-update-p99")
	b.ReportMetric(perEndpoint, "B/endpoint")
	b.ReportMetric(perProxy, "B/proxy")
	b.ReportMetric(float64(total), "endpoints")
	b.ReportMetric(float64(clients), "clients")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
