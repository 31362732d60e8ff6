package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"sort"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

// BenchmarkSecureXDSSetup is the time from dialling the secure port to the first CDS
// response for a proxyless client with its mesh certificate: TLS handshake, certificate
// authentication, binding, response. "direct" dials the primary; "via-forward" dials an
// east-west gateway's --forward in front of it (the primary-remote path). One new
// connection per iteration; p50 and p99 are reported. The cluster is a fake clientset:
// the cost measured is the primary's and the path's, not an API server's.
func BenchmarkSecureXDSSetup(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	root, _ := trust.NewRoot("cluster.local", trust.RootOptions{})
	inter, _ := root.NewIntermediate(trust.IntermediateOptions{Cluster: "west"})
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "echo-1", Namespace: "demo"},
		Spec: corev1.PodSpec{ServiceAccountName: "echo"}, Status: corev1.PodStatus{PodIP: "10.1.0.10"}}
	client := fake.NewClientset(pod, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system", Labels: map[string]string{primary.LabelNetwork: "net-1"}}})
	p, err := primary.New(primary.Config{ClusterID: "west", LocalClient: client, Debounce: 10 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	ca, err := trust.NewServer(trust.ServerConfig{Authority: inter, Clusters: p, LocalCluster: "west", Metrics: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	serving, err := inter.ServingCertificate([]string{"localhost"}, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serving}, ClientAuth: tls.RequestClientCert})))
	if err := p.RegisterSecureXDS(ctx, gs, ca, primary.SecureOptions{}); err != nil {
		b.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go gs.Serve(l)
	defer gs.Stop()
	go p.Run(ctx)
	for deadline := time.Now().Add(10 * time.Second); !p.Ready(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("primary not ready")
		}
	}
	fl, _ := net.Listen("tcp", "127.0.0.1:0")
	go eastwest.Forward(ctx, fl, l.Addr().String())

	cert := leafFor(b, inter, mesh.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"})
	roots := x509.NewCertPool()
	roots.AddCert(root.Cert)
	node := xdsNode("sidecar~10.1.0.10~echo-1.demo~demo.svc.cluster.local", map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": "west", "NETWORK": "net-1"})
	for _, bc := range []struct{ name, addr string }{{"direct", l.Addr().String()}, {"via-forward", fl.Addr().String()}} {
		b.Run(bc.name, func(b *testing.B) {
			var times []time.Duration
			for b.Loop() {
				start := time.Now()
				conn, err := grpc.NewClient(bc.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
					RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{*cert}})))
				if err != nil {
					b.Fatal(err)
				}
				sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
				s, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
				if err == nil {
					err = s.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: typeCluster})
				}
				if err == nil {
					_, err = s.Recv()
				}
				times = append(times, time.Since(start))
				scancel()
				conn.Close()
				if err != nil {
					b.Fatal(err)
				}
			}
			sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
			b.ReportMetric(float64(times[len(times)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(times[len(times)*99/100].Microseconds()), "p99-µs")
		})
	}
}
