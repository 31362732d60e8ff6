package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/istiobin"
	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// The control-plane comparison: an Isthmus primary and Istio's istiod (pilot-discovery,
// built by `make peers`) run side by side as processes, both watching the same real local
// cluster through its kubeconfig, both at their default 100 ms debounce. One raw ADS
// client per control plane (the same code, the same node, plaintext xDS on loopback:
// istiod's --grpcAddr, the primary's --plaintext-xds-address) subscribes to one
// service's endpoints. The harness writes the EndpointSlice and times, for each, the
// write → EDS received path. Reproduce the full run with `make bench-istiod`; the
// short run is TestControlPlaneVsIstiod.

const cpNamespace, cpService = "cpbench", "cpbench"

// cpPeer is one control plane process under comparison.
type cpPeer struct {
	name    string
	cmd     *exec.Cmd
	xds     string        // plaintext xDS address
	ready   time.Duration // from exec to its readiness endpoint answering 200
	logPath string
}

// startCPPeer runs bin with args, output to a log, and polls readyURL every 10 ms until
// it answers 200; the process is stopped when the test ends.
func startCPPeer(tb testing.TB, name, bin, readyURL, xds string, env []string, args ...string) *cpPeer {
	tb.Helper()
	dir := tb.TempDir()
	p := &cpPeer{name: name, xds: xds, logPath: filepath.Join(dir, name+".log")}
	logf, err := os.Create(p.logPath)
	if err != nil {
		tb.Fatal(err)
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), append(env, "HOME="+dir)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	exited := make(chan error, 1)
	start := time.Now()
	if err := p.cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	go func() { exited <- p.cmd.Wait() }()
	tb.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			p.cmd.Process.Kill()
			<-exited
		}
		logf.Close()
	})
	deadline := time.Now().Add(90 * time.Second)
	for {
		select {
		case err := <-exited:
			exited <- err
			tb.Fatalf("%s exited: %v\n%s", name, err, cpTail(p.logPath))
		default:
		}
		if resp, err := http.Get(readyURL); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				p.ready = time.Since(start)
				return p
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s not ready within 90 s\n%s", name, cpTail(p.logPath))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func cpTail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// rss returns the process's resident set (VmRSS) and its peak (VmHWM) in MiB.
func (p *cpPeer) rss(tb testing.TB) (cur, peak float64) {
	tb.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		tb.Fatalf("%s: %v", p.name, err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		kib, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
		switch k {
		case "VmRSS":
			cur = kib / 1024
		case "VmHWM":
			peak = kib / 1024
		}
	}
	return cur, peak
}

// edsUpdate is one EDS response: when it arrived and the addresses it carried.
type edsUpdate struct {
	at    time.Time
	addrs []string
}

// watchEDS opens a raw ADS stream to addr as a proxyless gRPC node and subscribes to
// cluster's endpoints, ACKing every response; updates carries each response.
func watchEDS(tb testing.TB, ctx context.Context, addr, cluster string) <-chan edsUpdate {
	tb.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	meta, _ := structpb.NewStruct(map[string]any{"GENERATOR": "grpc", "NAMESPACE": cpNamespace, "CLUSTER_ID": "c-1"})
	node := &core.Node{Id: "sidecar~127.0.0.1~bench." + cpNamespace + "~" + cpNamespace + ".svc.cluster.local", Metadata: meta}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNames: []string{cluster}}); err != nil {
		tb.Fatal(err)
	}
	updates := make(chan edsUpdate, 4096)
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			at := time.Now()
			stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{cluster},
				VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
			u := edsUpdate{at: at}
			for _, r := range resp.Resources {
				var cla endpoint.ClusterLoadAssignment
				if r.UnmarshalTo(&cla) == nil {
					for _, l := range cla.Endpoints {
						for _, e := range l.LbEndpoints {
							u.addrs = append(u.addrs, e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
						}
					}
				}
			}
			updates <- u
		}
	}()
	return updates
}

// awaitAddr returns when updates delivers addr, and how many responses came before it.
func awaitAddr(tb testing.TB, name string, updates <-chan edsUpdate, addr string) (time.Time, int) {
	tb.Helper()
	deadline := time.After(30 * time.Second)
	for n := 1; ; n++ {
		select {
		case u := <-updates:
			if slices.Contains(u.addrs, addr) {
				return u.at, n
			}
		case <-deadline:
			tb.Fatalf("%s: address %s not received within 30 s", name, addr)
		}
	}
}

// cpResult is one control plane's figures.
type cpResult struct {
	name                     string
	isolated                 []time.Duration // write → received, one change at a time
	burst                    time.Duration   // last write of the burst → its address received
	burstPushes              int             // EDS responses from the burst's first write to its last address
	burstFirst               time.Duration   // first write of the burst → its address (or a later one) received
	burstSpan                time.Duration   // first write → last write of the burst
	ready                    time.Duration
	rssMiB, peakMiB          float64
	isolatedP50, isolatedP99 time.Duration
}

func quantile(d []time.Duration, q float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*q))]
}

// compareControlPlanes starts a cluster, istiod and an Isthmus primary, and runs isolated
// single changes (each after a quiet pause longer than either debounce window) and then
// one burst of burst back-to-back writes.
func compareControlPlanes(tb testing.TB, set *istiobin.Set, bin string, isolated, burst int) []cpResult {
	clusters := kubetest.Start(tb, 1)
	c := clusters[0]
	cs, err := c.Client()
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	for _, ns := range []string{"istio-system", cpNamespace} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
	}
	kbins, err := kubetest.Binaries()
	if err != nil {
		tb.Fatal(err)
	}
	if out, err := exec.Command(kbins.Path(kubebin.Kubectl), "--kubeconfig", c.Kubeconfig,
		"apply", "--server-side", "-f", set.Path(istiobin.CRDs)).CombinedOutput(); err != nil {
		tb.Fatalf("apply Istio's CRDs: %v\n%s", err, out)
	}
	if _, err := cs.CoreV1().Services(cpNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: cpService, Namespace: cpNamespace},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}},
	}, metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}

	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	// Started one after the other, so neither's start-up time includes the other's.
	ih, ix := free(), free()
	isthmus := startCPPeer(tb, "isthmus", bin, "http://"+ih+"/readyz", ix, nil, "primary",
		"--kubeconfig", c.Kubeconfig, "--cluster-id", "c-1", "--http-address", ih, "--plaintext-xds-address", ix,
		"--log-level", "warn")
	dh, dx := free(), free()
	dir := tb.TempDir()
	istiod := startCPPeer(tb, "istiod", set.Path(istiobin.Discovery), "http://"+dh+"/ready", dx,
		[]string{"POD_NAMESPACE=istio-system", "POD_NAME=istiod-bench"}, "discovery",
		"--kubeconfig", c.Kubeconfig, "--clusterID", "c-1", "--domain", "cluster.local",
		"--httpAddr", dh, "--grpcAddr", dx, "--secureGRPCAddr", free(), "--monitoringAddr", free(), "--httpsAddr", free(),
		"--ctrlz_address", "127.0.0.1", "--ctrlz_port", free()[len("127.0.0.1:"):],
		"--meshConfig", filepath.Join(dir, "mesh"), "--networksConfig", filepath.Join(dir, "meshNetworks"),
		"--shutdownDuration", "1s", "--log_output_level", "default:warn")
	peers := []*cpPeer{isthmus, istiod}

	cluster := mesh.OutboundName{Port: 8080, Host: cpService + "." + cpNamespace + ".svc.cluster.local"}.ClusterName()
	watches := make([]<-chan edsUpdate, len(peers))
	for i, p := range peers {
		watches[i] = watchEDS(tb, ctx, p.xds, cluster)
	}
	res := make([]cpResult, len(peers))
	for i, p := range peers {
		res[i] = cpResult{name: p.name, ready: p.ready}
	}

	api := cs.DiscoveryV1().EndpointSlices(cpNamespace)
	write := writer(tb, ctx, api)
	quiet := func() {
		// The workload's definition of an isolated change: one after both debounce
		// windows (100 ms) have passed without changes. This is spacing, not a wait for
		// a condition.
		time.Sleep(300 * time.Millisecond)
	}
	for n := range isolated {
		quiet()
		addr := fmt.Sprintf("10.210.0.%d", n+1)
		start := write(addr)
		for i, p := range peers {
			at, _ := awaitAddr(tb, p.name, watches[i], addr)
			res[i].isolated = append(res[i].isolated, at.Sub(start))
		}
	}
	quiet()
	var first, last time.Time
	var addr string
	for n := range burst {
		addr = fmt.Sprintf("10.211.%d.%d", n/250, n%250+1)
		last = write(addr)
		if n == 0 {
			first = last
		}
	}
	for i, p := range peers {
		// The first response with any of the burst's addresses, then the one with its last.
		deadline := time.After(30 * time.Second)
		var u edsUpdate
		for {
			select {
			case u = <-watches[i]:
			case <-deadline:
				tb.Fatalf("%s: no address of the burst within 30 s", p.name)
			}
			if slices.ContainsFunc(u.addrs, func(a string) bool { return strings.HasPrefix(a, "10.211.") }) {
				break
			}
		}
		at, pushes := u.at, 1
		if !slices.Contains(u.addrs, addr) {
			var n int
			at, n = awaitAddr(tb, p.name, watches[i], addr)
			pushes += n
		}
		res[i].burstFirst, res[i].burst, res[i].burstPushes, res[i].burstSpan = u.at.Sub(first), at.Sub(last), pushes, last.Sub(first)
	}
	for i, p := range peers {
		res[i].rssMiB, res[i].peakMiB = p.rss(tb)
		res[i].isolatedP50, res[i].isolatedP99 = quantile(res[i].isolated, 0.5), quantile(res[i].isolated, 0.99)
	}
	return res
}

// writer returns a function that sets the one EndpointSlice of the service to a single
// ready address and returns when the API server accepted the write.
func writer(tb testing.TB, ctx context.Context, api interface {
	Create(context.Context, *discoveryv1.EndpointSlice, metav1.CreateOptions) (*discoveryv1.EndpointSlice, error)
	Update(context.Context, *discoveryv1.EndpointSlice, metav1.UpdateOptions) (*discoveryv1.EndpointSlice, error)
}) func(addr string) time.Time {
	port, pname, ready := int32(8080), "grpc", true
	var slice *discoveryv1.EndpointSlice
	return func(addr string) time.Time {
		tb.Helper()
		eps := []discoveryv1.Endpoint{{Addresses: []string{addr}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}}}
		start := time.Now()
		var err error
		if slice == nil {
			slice, err = api.Create(ctx, &discoveryv1.EndpointSlice{
				ObjectMeta: metav1.ObjectMeta{Name: cpService + "-bench", Namespace: cpNamespace,
					Labels: map[string]string{discoveryv1.LabelServiceName: cpService, discoveryv1.LabelManagedBy: "isthmus-bench"}},
				AddressType: discoveryv1.AddressTypeIPv4,
				Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port}},
				Endpoints:   eps,
			}, metav1.CreateOptions{})
		} else {
			slice.Endpoints = eps
			slice, err = api.Update(ctx, slice, metav1.UpdateOptions{})
		}
		if err != nil {
			tb.Fatal(err)
		}
		return start
	}
}

func cpTable(res []cpResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-8s %10s %10s %11s %10s %8s %10s %9s %9s\n", "", "iso p50", "iso p99", "burst 1st", "burst end", "pushes", "ready", "RSS MiB", "peak MiB")
	for _, r := range res {
		fmt.Fprintf(&b, "%-8s %10s %10s %11s %10s %8d %10s %9.1f %9.1f\n", r.name,
			r.isolatedP50.Round(100*time.Microsecond), r.isolatedP99.Round(100*time.Microsecond),
			r.burstFirst.Round(100*time.Microsecond), r.burst.Round(100*time.Microsecond), r.burstPushes,
			r.ready.Round(time.Millisecond), r.rssMiB, r.peakMiB)
	}
	if len(res) > 0 {
		fmt.Fprintf(&b, "burst written in %s\n", res[0].burstSpan.Round(time.Millisecond))
	}
	return b.String()
}

// TestControlPlaneVsIstiod is the comparison's short mode: a few isolated changes and a
// burst of 20, so that CI runs the harness end to end (both control planes must deliver
// every change) and it cannot rot. Its figures are logged, not asserted.
func TestControlPlaneVsIstiod(t *testing.T) {
	set := istioPeers(t)
	res := compareControlPlanes(t, set, buildIsthmus(t), 3, 20)
	t.Logf("short run (3 isolated, burst of 20):\n%s", cpTable(res))
}

// BenchmarkControlPlaneVsIstiod is the full comparison recorded in docs/benchmarks.md:
//
//	make bench-istiod
func BenchmarkControlPlaneVsIstiod(b *testing.B) {
	if testing.Short() {
		b.Skip("real API server and istiod; runs without -short")
	}
	set, err := istiobin.Lookup(istiobin.Options{})
	if err != nil {
		b.Skipf("needs istiod built (make peers): %v", err)
	}
	binDir := b.TempDir()
	bin := filepath.Join(binDir, "isthmus")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	for range b.N {
		res := compareControlPlanes(b, set, bin, 30, 1000)
		b.Logf("30 isolated changes, burst of 1000:\n%s", cpTable(res))
		for _, r := range res {
			b.ReportMetric(float64(r.isolatedP50.Microseconds())/1000, r.name+"-iso-ms-p50")
			b.ReportMetric(float64(r.isolatedP99.Microseconds())/1000, r.name+"-iso-ms-p99")
			b.ReportMetric(float64(r.burstFirst.Microseconds())/1000, r.name+"-burst-first-ms")
			b.ReportMetric(float64(r.burst.Microseconds())/1000, r.name+"-burst-ms")
			b.ReportMetric(float64(r.burstPushes), r.name+"-burst-pushes")
			b.ReportMetric(float64(r.ready.Milliseconds()), r.name+"-ready-ms")
			b.ReportMetric(r.rssMiB, r.name+"-rss-MiB")
		}
	}
}
