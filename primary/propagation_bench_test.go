package primary_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// Reproduce with (root, for the shared environment's pod network):
//
//	go test ./primary -run '^$' -bench Propagation -benchtime 1x
//
// An EndpointSlice is written in a real API server; the benchmark measures until a
// connected ADS client (subscribed to that service's endpoints) receives the new address.
// The path is API server → watch → watcher queue → registry → debounce (20 ms in this
// environment; 100 ms by default) → build → xDS. "clusters=1": the primary watches only
// its own cluster and the slice is written there; "clusters=3": it watches three and the
// slice is written in a remote one.

func BenchmarkPropagation(b *testing.B) {
	if env.primary == nil {
		b.Skip("needs the shared clusters (root, without -short)")
	}
	b.Run("clusters=1", func(b *testing.B) { benchPropagation(b, 0) })
	b.Run("clusters=3", func(b *testing.B) {
		for _, i := range []int{1, 2} {
			linkForBench(b, i)
		}
		benchPropagation(b, 2)
	})
}

func linkForBench(b *testing.B, i int) {
	// linkCluster needs a *testing.T only for Fatal; run it in a throwaway test context.
	ok := testing.RunTests(func(pat, str string) (bool, error) { return true, nil }, []testing.InternalTest{{
		Name: "link", F: func(t *testing.T) { linkCluster(t, i) },
	}})
	if !ok {
		b.Fatalf("link cluster %d", i)
	}
}

func benchPropagation(b *testing.B, i int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cs := env.clients[i]
	ns := "prop"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		b.Fatal(err)
	}
	if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "prop", Namespace: ns},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}},
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient(env.xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		b.Fatal(err)
	}
	meta, _ := structpb.NewStruct(map[string]any{primary.MetaGenerator: "grpc"})
	name := mesh.OutboundName{Port: 8080, Host: "prop.prop.svc.cluster.local"}.ClusterName()
	stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: fmt.Sprintf("sidecar~bench~%d", i), Metadata: meta},
		TypeUrl: resource.EndpointType, ResourceNames: []string{name}})
	got := make(chan []string, 64)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{name}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
			var addrs []string
			for _, r := range resp.Resources {
				var cla endpoint.ClusterLoadAssignment
				if r.UnmarshalTo(&cla) == nil {
					for _, l := range cla.Endpoints {
						for _, e := range l.LbEndpoints {
							addrs = append(addrs, e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
						}
					}
				}
			}
			got <- addrs
		}
	}()
	sliceAPI := cs.DiscoveryV1().EndpointSlices(ns)
	port, pname, ready := int32(8080), "grpc", true
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "prop-bench", Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: "prop", discoveryv1.LabelManagedBy: "isthmus-bench"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port}},
	}
	var lat []time.Duration
	const writes = 50
	for n := range writes {
		addr := fmt.Sprintf("10.200.%d.%d", i, n+1)
		slice.Endpoints = []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}}
		start := time.Now()
		var err error
		if n == 0 {
			sliceAPI.Delete(ctx, slice.Name, metav1.DeleteOptions{})
			slice, err = sliceAPI.Create(ctx, slice, metav1.CreateOptions{})
		} else {
			slice, err = sliceAPI.Update(ctx, slice, metav1.UpdateOptions{})
		}
		if err != nil {
			b.Fatal(err)
		}
		deadline := time.After(10 * time.Second)
	wait:
		for {
			select {
			case addrs := <-got:
				if slices.Contains(addrs, addr) {
					lat = append(lat, time.Since(start))
					break wait
				}
			case <-deadline:
				b.Fatalf("write %d: address %s not received within 10 s", n, addr)
			}
		}
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "ms-p99")
}
