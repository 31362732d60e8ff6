package trust_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// Reproduce with:
//
//	go test ./trust -run '^$' -bench BundleEndpoint -benchtime 3s; go test ./trust -run '^$' -bench BundleChange -benchtime 20x
//
// BundleEndpointFetch: go-spiffe's federation.FetchBundle against a primary's bundle
// endpoint over https_spiffe, a new TLS connection per fetch (as peers fetch), fetchers in
// parallel; fetches/s.
// BundleChange: a new root published at domain B (its CA's anchors change) until every
// workload of domain A has it in its bundle map: B's bundle endpoint, A's Federation
// fetching it (refresh hint 1 s), A's bundle store on a real API server, two workload
// agents watching the store and writing their SPIFFE bundle maps. p50/p99 over b.N
// changes. grpc-go re-reads the bundle map file every refresh_interval (5 s in the
// scenario bootstrap) on top of this.

// domainB is a trust domain whose anchors a benchmark can change.
type domainB struct {
	anchors atomic.Pointer[[]*x509.Certificate]
	root    *trust.Authority
	inter   *trust.Authority
	ep      *trust.BundleEndpoint
	url     string
	id      mesh.Identity
}

func newDomainB(tb testing.TB, hint time.Duration) *domainB {
	tb.Helper()
	d := &domainB{}
	d.root, _ = trust.NewRoot("west.example", trust.RootOptions{})
	d.inter, _ = d.root.NewIntermediate(trust.IntermediateOptions{Cluster: "b"})
	a := []*x509.Certificate{d.root.Cert}
	d.anchors.Store(&a)
	var err error
	d.ep, err = trust.NewBundleEndpoint(trust.BundleEndpointConfig{TrustDomain: "west.example", RefreshHint: hint,
		Anchors: func() []*x509.Certificate { return *d.anchors.Load() }})
	if err != nil {
		tb.Fatal(err)
	}
	d.id, _ = trust.EndpointIdentity("west.example", "istio-system")
	l, err := tls.Listen("tcp", "127.0.0.1:0", trust.SPIFFETLSConfig(func() *trust.Authority { return d.inter }, d.id))
	if err != nil {
		tb.Fatal(err)
	}
	srv := &http.Server{Handler: d.ep}
	go srv.Serve(l)
	tb.Cleanup(func() { srv.Close() })
	d.url = "https://" + l.Addr().String() + "/"
	return d
}

func BenchmarkBundleEndpointFetch(b *testing.B) {
	d := newDomainB(b, time.Minute)
	td := spiffeid.RequireTrustDomainFromString("west.example")
	bootstrap := spiffebundle.FromX509Authorities(td, []*x509.Certificate{d.root.Cert})
	id := spiffeid.RequireFromString(d.id.String())
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := federation.FetchBundle(context.Background(), td, d.url, federation.WithSPIFFEAuth(bootstrap, id)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "fetches/s")
}

func BenchmarkBundleChange(b *testing.B) {
	needEnv(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	d := newDomainB(b, time.Second)
	ns := "bench-bundle-change"
	ensureNamespace(b, ns)
	boot, _ := trust.ParsePEMBundle("west.example", d.root.RootPEM())
	raw, _ := boot.Marshal()
	rel := trust.Relationship{TrustDomain: "west.example", EndpointURL: d.url, Profile: trust.ProfileSPIFFE, EndpointSPIFFEID: d.id.String(), BootstrapBundle: string(raw)}
	if _, err := (trust.FederationStore{Client: env.client, Namespace: ns}).Update(ctx, func(r []trust.Relationship) ([]trust.Relationship, error) {
		return trust.AddRelationship(nil, rel, "east.example")
	}); err != nil {
		b.Fatal(err)
	}
	rootA, _ := trust.NewRoot("east.example", trust.RootOptions{})
	localA, _ := trust.NewBundleEndpoint(trust.BundleEndpointConfig{TrustDomain: "east.example",
		Anchors: func() []*x509.Certificate { return []*x509.Certificate{rootA.Cert} }})
	fed, err := trust.NewFederation(trust.FederationConfig{TrustDomain: "east.example", Client: env.client, Namespace: ns, Endpoint: localA, MinRefresh: 10 * time.Millisecond})
	if err != nil {
		b.Fatal(err)
	}
	go fed.Run(ctx)
	// Two workloads' agents of domain A.
	type agent struct {
		mu     sync.Mutex
		writer *trust.BundleMapWriter
		seen   map[string]time.Time // root fingerprint → when its bundle map first had it
	}
	var agents []*agent
	for range 2 {
		a := &agent{seen: map[string]time.Time{}}
		peers := trust.NewBundleSet()
		a.writer = &trust.BundleMapWriter{Path: filepath.Join(b.TempDir(), trust.AgentBundleMapFile), Peers: peers, OnWrite: func(data []byte) {
			m, err := trust.ParseBundleMap(data)
			if err != nil {
				return
			}
			now := time.Now()
			a.mu.Lock()
			defer a.mu.Unlock()
			if wb, ok := m["west.example"]; ok {
				for _, c := range wb.X509Authorities() {
					if _, ok := a.seen[trust.Fingerprint(c.Raw)]; !ok {
						a.seen[trust.Fingerprint(c.Raw)] = now
					}
				}
			}
		}}
		a.writer.SetLocal("east.example", rootA.RootPEM())
		go trust.WatchBundleStore(ctx, env.client, ns, peers, func() { a.writer.Update() }, nil)
		agents = append(agents, a)
	}
	var lat []time.Duration
	b.ResetTimer()
	for range b.N {
		// Changes land at a random point of A's fetch cycle, as real ones do.
		time.Sleep(time.Duration(rand.Int64N(int64(time.Second))))
		next, _ := trust.NewRoot("west.example", trust.RootOptions{})
		fp := trust.Fingerprint(next.Cert.Raw)
		cur := append(slices.Clone(*d.anchors.Load()), next.Cert)
		start := time.Now()
		d.anchors.Store(&cur)
		var last time.Time
		for _, a := range agents {
			deadline := time.Now().Add(30 * time.Second)
			for {
				a.mu.Lock()
				at, ok := a.seen[fp]
				a.mu.Unlock()
				if ok {
					if at.After(last) {
						last = at
					}
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("the new root did not reach an agent within 30 s: %+v", fed.Status())
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		lat = append(lat, last.Sub(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(lat[min(len(lat)-1, len(lat)*99/100)].Milliseconds()), "p99-ms")
}

func ensureNamespace(tb testing.TB, ns string) {
	tb.Helper()
	_, err := env.client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		tb.Fatal(err)
	}
}
