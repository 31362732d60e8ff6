package primary_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	apinet "istio.io/api/networking/v1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/primary"
)

// Reproduce with (root, for the shared environment):
//
//	go test ./primary -run '^$' -bench VirtualServiceChange -benchtime 1x
//
// The exportTo-clients cases add ten namespaces' own exportTo "." VirtualServices
// for the same host (11 traffic plans per change); the clients see the public one.
//
// N proxyless-gRPC ADS streams (over N/100 connections) watch one service's listener; a
// VirtualService's route timeout is changed in the real API server, and the benchmark
// measures until each stream has received the listener carrying the new timeout: the
// path API server → Istio informer → registry → debounce (20 ms here) → plan → build →
// marshal once per view → N sends. ms-p50/ms-p99 are over every stream and write;
// ms-all-p50/ms-all-p99 are, per write, until the last stream had it.
func BenchmarkVirtualServiceChange(b *testing.B) {
	if env.primary == nil {
		b.Skip("needs the shared clusters (root, without -short)")
	}
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		b.Fatal(err)
	}
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "vsbench"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		b.Fatal(err)
	}
	if _, err := cs.CoreV1().Services("vsbench").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "bench", Namespace: "vsbench"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}},
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		b.Fatal(err)
	}
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) { benchVSChange(b, n) })
	}
	// The same with 10 other namespaces each overriding the route with their own
	// exportTo "." VirtualService: 11 traffic plans on every change instead of one.
	for i := range 10 {
		ns := fmt.Sprintf("vsbench-x%d", i)
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			b.Fatal(err)
		}
		vs := &networkingv1.VirtualService{
			ObjectMeta: metav1.ObjectMeta{Name: "override", Namespace: ns},
			Spec: apinet.VirtualService{Hosts: []string{"bench.vsbench.svc.cluster.local"}, ExportTo: []string{"."}, Http: []*apinet.HTTPRoute{{
				Route:   []*apinet.HTTPRouteDestination{{Destination: &apinet.Destination{Host: "bench.vsbench.svc.cluster.local"}}},
				Timeout: durationpb.New(time.Minute),
			}}},
		}
		if _, err := env.istio.NetworkingV1().VirtualServices(ns).Create(ctx, vs, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			b.Fatal(err)
		}
		defer env.istio.NetworkingV1().VirtualServices(ns).Delete(ctx, "override", metav1.DeleteOptions{})
	}
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("exportTo-clients=%d", n), func(b *testing.B) { benchVSChange(b, n) })
	}
}

func benchVSChange(b *testing.B, clients int) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	vsAPI := env.istio.NetworkingV1().VirtualServices("vsbench")
	vsAPI.Delete(ctx, "bench", metav1.DeleteOptions{})
	vs := &networkingv1.VirtualService{
		ObjectMeta: metav1.ObjectMeta{Name: "bench", Namespace: "vsbench"},
		Spec: apinet.VirtualService{Hosts: []string{"bench"}, Http: []*apinet.HTTPRoute{{
			Route:   []*apinet.HTTPRouteDestination{{Destination: &apinet.Destination{Host: "bench"}}},
			Timeout: durationpb.New(time.Second),
		}}},
	}
	vs, err := vsAPI.Create(ctx, vs, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	const name = "bench.vsbench.svc.cluster.local:8080"
	meta, _ := structpb.NewStruct(map[string]any{primary.MetaGenerator: "grpc"})
	// seen[i] receives the route timeouts stream i gets.
	seen := make([]chan time.Duration, clients)
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range clients {
		if i%100 == 0 {
			c, err := grpc.NewClient(env.xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			conns = append(conns, c)
		}
		stream, err := discovery.NewAggregatedDiscoveryServiceClient(conns[len(conns)-1]).StreamAggregatedResources(ctx)
		if err != nil {
			b.Fatal(err)
		}
		stream.Send(&discovery.DiscoveryRequest{Node: &core.Node{Id: fmt.Sprintf("sidecar~10.0.0.1~vsbench-%d.vsbench~vsbench.svc.cluster.local", i), Metadata: meta},
			TypeUrl: resource.ListenerType, ResourceNames: []string{name}})
		seen[i] = make(chan time.Duration, 64)
		go func(ch chan time.Duration) {
			for {
				resp, err := stream.Recv()
				if err != nil {
					return
				}
				stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.ListenerType, ResourceNames: []string{name}, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
				for _, r := range resp.Resources {
					var l listener.Listener
					var m hcm.HttpConnectionManager
					if r.UnmarshalTo(&l) != nil || l.Name != name || l.GetApiListener().GetApiListener().UnmarshalTo(&m) != nil {
						continue
					}
					for _, vh := range m.GetRouteConfig().GetVirtualHosts() {
						for _, rt := range vh.GetRoutes() {
							if t := rt.GetRoute().GetTimeout(); t != nil {
								select {
								case ch <- t.AsDuration():
								default: // the reader only wants the newest
								}
							}
						}
					}
				}
			}
		}(seen[i])
	}
	// waitAll returns each stream's latency until it has seen timeout want.
	waitAll := func(start time.Time, want time.Duration) []time.Duration {
		lat := make([]time.Duration, clients)
		var wg sync.WaitGroup
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				deadline := time.After(30 * time.Second)
				for {
					select {
					case got := <-seen[i]:
						if got == want {
							lat[i] = time.Since(start)
							return
						}
					case <-deadline:
						lat[i] = -1
						return
					}
				}
			}()
		}
		wg.Wait()
		return lat
	}
	if lat := waitAll(time.Now(), time.Second); slices.Contains(lat, -1) {
		b.Fatal("not every stream received the first VirtualService within 30 s")
	}
	var each, all []time.Duration
	const writes = 20
	b.ResetTimer()
	for n := range writes {
		want := time.Duration(2000+n) * time.Millisecond
		vs.Spec.Http[0].Timeout = durationpb.New(want)
		start := time.Now()
		if vs, err = vsAPI.Update(ctx, vs, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		lat := waitAll(start, want)
		if slices.Contains(lat, -1) {
			b.Fatalf("write %d: not every stream received the change within 30 s", n)
		}
		each = append(each, lat...)
		all = append(all, slices.Max(lat))
	}
	slices.Sort(each)
	slices.Sort(all)
	b.ReportMetric(float64(each[len(each)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(each[len(each)*99/100].Microseconds())/1000, "ms-p99")
	b.ReportMetric(float64(all[len(all)/2].Microseconds())/1000, "ms-all-p50")
	b.ReportMetric(float64(all[len(all)*99/100].Microseconds())/1000, "ms-all-p99")
}
