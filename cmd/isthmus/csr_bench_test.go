package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/istiobin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/trust"
)

// The CSR comparison: the Isthmus CA (`isthmus primary --ca-dir`, its own process) and
// istiod's CA (its CSR API on the secure port, its self-signed root), both reviewing the
// caller's service-account token in the same real cluster, driven by the same client
// (TLS gRPC, one connection, the same CSR and token) at 1 and 2 parallel calls. Beside
// them, in this process, the same trust.Server method called directly ("handler", no
// gRPC or TLS) and x509.CreateCertificate alone with the same intermediate ("raw", the
// floor). CPU per certificate is the CA process's own (/proc/<pid>/stat), so the client
// is not counted; for handler and raw it is this process's. Reproduce the full run with
// `make bench-csr`; the short run is TestCSRVsIstiod.

const csrNamespace, csrAccount = "csrbench", "echo"

// csrResult is one path at one parallelism: medians over rounds.
type csrResult struct {
	path     string
	parallel int
	p50, p99 time.Duration // per call, median over rounds
	perSec   float64       // certificates per second
	cpu      time.Duration // the signing process's CPU per certificate
}

// processCPU returns pid's user+system CPU (10 ms ticks) from /proc.
func processCPU(tb testing.TB, pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// selfCPU returns this process's CPU with microsecond resolution.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// drive makes n calls of call, parallel at once, and returns per-call latencies (sorted)
// and the wall time.
func drive(tb testing.TB, n, parallel int, call func() error) ([]time.Duration, time.Duration) {
	lat := make([]time.Duration, n)
	var wg sync.WaitGroup
	errs := make(chan error, parallel)
	start := time.Now()
	for w := range parallel {
		wg.Go(func() {
			for i := w; i < n; i += parallel {
				t0 := time.Now()
				if err := call(); err != nil {
					errs <- err
					return
				}
				lat[i] = time.Since(t0)
			}
		})
	}
	wg.Wait()
	wall := time.Since(start)
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
	slices.Sort(lat)
	return lat, wall
}

// compareCSR runs rounds of n CSRs per path and parallelism, interleaved by round.
func compareCSR(tb testing.TB, set *istiobin.Set, bin string, n, rounds int) []csrResult {
	c := kubetest.Start(tb, 1)[0]
	cs, err := c.Client()
	if err != nil {
		tb.Fatal(err)
	}
	ctx := context.Background()
	for _, ns := range []string{"istio-system", csrNamespace} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			tb.Fatal(err)
		}
	}
	if _, err := cs.CoreV1().ServiceAccounts(csrNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: csrAccount}}, metav1.CreateOptions{}); err != nil {
		tb.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts(csrNamespace).CreateToken(ctx, csrAccount, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	token := tr.Status.Token
	spiffe := "spiffe://cluster.local/ns/" + csrNamespace + "/sa/" + csrAccount
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(spiffe)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		tb.Fatal(err)
	}
	csr := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))

	// The Isthmus CA: a root and this cluster's intermediate, served by the primary.
	root, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		tb.Fatal(err)
	}
	inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: "c-1"})
	if err != nil {
		tb.Fatal(err)
	}
	caDir := filepath.Join(tb.TempDir(), "ca")
	if err := inter.WriteDir(caDir); err != nil {
		tb.Fatal(err)
	}
	ih, ica := freeAddrTB(tb), freeAddrTB(tb)
	isthmus := startCPPeer(tb, "isthmus", bin, "http://"+ih+"/readyz", "", nil, "primary",
		"--kubeconfig", c.Kubeconfig, "--cluster-id", "c-1", "--http-address", ih,
		"--ca-dir", caDir, "--ca-address", ica, "--log-level", "warn")
	isthmusRoots := x509.NewCertPool()
	isthmusRoots.AddCert(root.Cert)
	dial := func(addr string, roots *x509.CertPool) pb.IstioCertificateServiceClient {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs: roots, ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS12})))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { conn.Close() })
		return pb.NewIstioCertificateServiceClient(conn)
	}
	callCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	req := &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: 3600}
	grpcCall := func(cl pb.IstioCertificateServiceClient) func() error {
		return func() error {
			resp, err := cl.CreateCertificate(callCtx, req)
			if err == nil && len(resp.GetCertChain()) < 2 {
				err = fmt.Errorf("chain of %d", len(resp.GetCertChain()))
			}
			return err
		}
	}

	// In process: the same server method, and the raw signature.
	srv, err := trust.NewServer(trust.ServerConfig{Authority: inter, Clusters: trust.StaticClients{"c-1": cs}, LocalCluster: "c-1"})
	if err != nil {
		tb.Fatal(err)
	}
	inCtx := metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+token))
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u},
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}

	type path struct {
		name string
		pid  int // 0: this process
		call func() error
	}
	paths := []path{
		{"raw x509.CreateCertificate", 0, func() error {
			_, err := x509.CreateCertificate(rand.Reader, tmpl, inter.Cert, key.Public(), inter.Key)
			return err
		}},
		{"Isthmus handler (in process)", 0, func() error { _, err := srv.CreateCertificate(inCtx, req); return err }},
		{"Isthmus CA, TLS gRPC", isthmus.cmd.Process.Pid, grpcCall(dial(ica, isthmusRoots))},
	}
	// istiod with its own self-signed CA (istio-ca-secret), CSR API on --secureGRPCAddr;
	// nil set (ISTHMUS_CSR_BENCH_NO_ISTIOD, trying the harness before istiod is built)
	// leaves it out.
	if set != nil {
		dh, dca := freeAddrTB(tb), freeAddrTB(tb)
		dir := tb.TempDir()
		istiod := startCPPeer(tb, "istiod", set.Path(istiobin.Discovery), "http://"+dh+"/ready", "",
			[]string{"POD_NAMESPACE=istio-system", "POD_NAME=istiod-csr-bench"}, "discovery",
			"--kubeconfig", c.Kubeconfig, "--clusterID", "c-1", "--domain", "cluster.local",
			"--httpAddr", dh, "--grpcAddr", freeAddrTB(tb), "--secureGRPCAddr", dca, "--monitoringAddr", freeAddrTB(tb),
			"--httpsAddr", freeAddrTB(tb), "--ctrlz_address", "127.0.0.1", "--ctrlz_port", freeAddrTB(tb)[len("127.0.0.1:"):],
			"--meshConfig", filepath.Join(dir, "mesh"), "--networksConfig", filepath.Join(dir, "meshNetworks"),
			"--shutdownDuration", "1s", "--log_output_level", "default:warn")
		sec, err := cs.CoreV1().Secrets("istio-system").Get(ctx, "istio-ca-secret", metav1.GetOptions{})
		if err != nil {
			tb.Fatalf("istiod's CA secret: %v", err)
		}
		istioRoots := x509.NewCertPool()
		if !istioRoots.AppendCertsFromPEM(sec.Data["ca-cert.pem"]) {
			tb.Fatal("istio-ca-secret has no ca-cert.pem")
		}
		paths = append(paths, path{"istiod CA, TLS gRPC", istiod.cmd.Process.Pid, grpcCall(dial(dca, istioRoots))})
	}
	for _, p := range paths { // warm: connections, TokenReview caches, first-call costs
		drive(tb, 5, 1, p.call)
	}
	type key2 struct{ path, par int }
	samples := map[key2][]csrResult{}
	for range rounds {
		for _, par := range []int{1, 2} {
			for i, p := range paths {
				cpu0 := selfCPU()
				if p.pid != 0 {
					cpu0 = processCPU(tb, p.pid)
				}
				lat, wall := drive(tb, n, par, p.call)
				cpu1 := selfCPU()
				if p.pid != 0 {
					cpu1 = processCPU(tb, p.pid)
				}
				samples[key2{i, par}] = append(samples[key2{i, par}], csrResult{path: p.name, parallel: par,
					p50: lat[len(lat)/2], p99: lat[min(len(lat)-1, len(lat)*99/100)],
					perSec: float64(n) / wall.Seconds(), cpu: (cpu1 - cpu0) / time.Duration(n)})
			}
		}
	}
	var out []csrResult
	for _, par := range []int{1, 2} {
		for i := range paths {
			s := samples[key2{i, par}]
			med := func(f func(csrResult) float64) float64 {
				v := make([]float64, len(s))
				for j, r := range s {
					v[j] = f(r)
				}
				slices.Sort(v)
				return v[len(v)/2]
			}
			out = append(out, csrResult{path: s[0].path, parallel: par,
				p50:    time.Duration(med(func(r csrResult) float64 { return float64(r.p50) })),
				p99:    time.Duration(med(func(r csrResult) float64 { return float64(r.p99) })),
				perSec: med(func(r csrResult) float64 { return r.perSec }),
				cpu:    time.Duration(med(func(r csrResult) float64 { return float64(r.cpu) }))})
		}
	}
	return out
}

func freeAddrTB(tb testing.TB) string {
	tb.Helper()
	if t, ok := tb.(*testing.T); ok {
		return freeAddr(t)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// csrTable prints the results with ratios against raw signing (raw time ÷ path time, so
// 1.0 is the floor) and, for Isthmus's gRPC path, against istiod.
func csrTable(res []csrResult) string {
	var b strings.Builder
	b.WriteString("| path | parallel | p50 | p99 | certs/s | CPU per cert (signing process) | raw p50 ÷ p50 |\n|---|---|---|---|---|---|---|\n")
	raw := map[int]time.Duration{}
	for _, r := range res {
		if strings.HasPrefix(r.path, "raw") {
			raw[r.parallel] = r.p50
		}
	}
	us := func(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }
	for _, r := range res {
		fmt.Fprintf(&b, "| %s | %d | %s | %s | %.0f | %s | %.2f |\n", r.path, r.parallel, us(r.p50), us(r.p99), r.perSec, us(r.cpu),
			float64(raw[r.parallel])/float64(r.p50))
	}
	for _, par := range []int{1, 2} {
		var is, id csrResult
		for _, r := range res {
			if r.parallel == par && strings.HasPrefix(r.path, "Isthmus CA") {
				is = r
			}
			if r.parallel == par && strings.HasPrefix(r.path, "istiod") {
				id = r
			}
		}
		if id.p50 > 0 && id.cpu > 0 {
			fmt.Fprintf(&b, "\nparallel %d, Isthmus CA ÷ istiod CA: p50 %.2f, certs/s %.2f, CPU per cert %.2f", par,
				float64(is.p50)/float64(id.p50), is.perSec/id.perSec, float64(is.cpu)/float64(id.cpu))
		}
	}
	return b.String() + "\n"
}

// TestCSRVsIstiod is the CSR comparison's short mode (one round of 20 CSRs per path), so
// that CI runs it end to end: every path must issue every certificate. Figures are
// logged, not asserted.
func TestCSRVsIstiod(t *testing.T) {
	var set *istiobin.Set
	if os.Getenv("ISTHMUS_CSR_BENCH_NO_ISTIOD") == "" {
		set = istioPeers(t)
	} else if testing.Short() {
		t.Skip("integration test: real API server; runs without -short")
	}
	res := compareCSR(t, set, buildIsthmus(t), 20, 1)
	t.Logf("short run (1 round of 20 CSRs per path):\n%s", csrTable(res))
}

// BenchmarkCSRVsIstiod is the full comparison recorded in docs/benchmarks.md:
//
//	make bench-csr
func BenchmarkCSRVsIstiod(b *testing.B) {
	if testing.Short() {
		b.Skip("real API server and istiod; runs without -short")
	}
	set, err := istiobin.Lookup(istiobin.Options{})
	if err != nil {
		b.Skipf("needs istiod built (make peers): %v", err)
	}
	bin := filepath.Join(b.TempDir(), "isthmus")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	for range b.N {
		res := compareCSR(b, set, bin, 1000, 5)
		b.Logf("5 rounds of 1000 CSRs per path and parallelism, medians:\n%s", csrTable(res))
	}
}
