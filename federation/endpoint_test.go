package federation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// sink records imports per peer.
type sink struct {
	mu  sync.Mutex
	got map[mesh.MeshID][]ImportedService
}

func (s *sink) ReplaceImports(peer mesh.MeshID, services []ImportedService) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.got == nil {
		s.got = map[mesh.MeshID][]ImportedService{}
	}
	s.got[peer] = slices.Clone(services)
}

func (s *sink) hosts(peer mesh.MeshID) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, is := range s.got[peer] {
		out = append(out, string(is.Hostname))
	}
	slices.Sort(out)
	return out
}

// sinks hands imports to each sink.
type sinks []ImportSink

func (s sinks) ReplaceImports(peer mesh.MeshID, services []ImportedService) {
	for _, x := range s {
		x.ReplaceImports(peer, services)
	}
}

// testMesh is one in-process mesh: a real CA, a federation endpoint on loopback, its
// gossip pool, a static export source and an import sink.
type testMesh struct {
	t        testing.TB
	id       mesh.MeshID
	td       mesh.TrustDomain
	root, ca *trust.Authority
	cert     *tls.Certificate
	feed     *MeshFeed
	addr     string
	gossip   int
	store    *MemoryStore
	exports  *StaticExports
	sink     *sink
	reg      *prometheus.Registry
	ep       *Endpoint
	stop     context.CancelFunc
	done     chan error
	stale    time.Duration
	clockOff atomic.Int64 // nanoseconds added to the endpoint's clock
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// gossipPorts are the ports freeGossipPort handed out in this process; guarded by
// gossipPortsMu.
var (
	gossipPortsMu sync.Mutex
	gossipPorts   = map[int]bool{}
)

// freeGossipPort returns a port free for both TCP and UDP on 127.0.0.1, below the
// kernel's ephemeral range and not handed out before in this process. A mesh binds its
// gossip port only at its first token or peering, long after this: a port of the
// ephemeral range (freePort's) may by then be any socket's local port — an outgoing
// connection of this or another test process, a DNS lookup — and the pool would not
// start. Ports below the range are only ever taken by an explicit bind.
func freeGossipPort(t testing.TB) int {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	const base = 10000
	if low <= base+1000 {
		return freePort(t) // an unusual range: no room below it
	}
	gossipPortsMu.Lock()
	defer gossipPortsMu.Unlock()
	for range 1000 {
		port := base + rand.IntN(low-base)
		if gossipPorts[port] {
			continue
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		u, err := net.ListenPacket("udp", addr)
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		gossipPorts[port] = true
		return port
	}
	t.Fatal("no free gossip port below the ephemeral range")
	return 0
}

func newTestMesh(t testing.TB, id mesh.MeshID, td mesh.TrustDomain) *testMesh {
	t.Helper()
	return newTestMeshStale(t, id, td, -1)
}

// newTestMeshStale is newTestMesh with a stale window (negative: withdraw at once).
func newTestMeshStale(t testing.TB, id mesh.MeshID, td mesh.TrustDomain, stale time.Duration) *testMesh {
	t.Helper()
	root := testRoot(t, td)
	ca, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: mesh.ClusterID(string(id) + "-c1")})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := IssueEndpointCertificate(context.Background(), ca, "istio-system", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	m := &testMesh{t: t, id: id, td: td, root: root, ca: ca, cert: cert, feed: NewMeshFeed(), addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), gossip: freeGossipPort(t),
		store: &MemoryStore{}, exports: NewStaticExports(nil), sink: &sink{}, stale: stale}
	m.start()
	t.Cleanup(m.kill)
	return m
}

// start runs the endpoint (again, after kill, with the same store and addresses).
func (m *testMesh) start() {
	m.t.Helper()
	// After kill, the port may briefly be held by another socket of this process (an
	// outgoing connection given it as its ephemeral port): retry for a while.
	var l net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if l, err = net.Listen("tcp", m.addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			m.t.Fatal(err)
		}
	}
	m.reg = prometheus.NewRegistry()
	m.ep, err = NewEndpoint(EndpointConfig{Mesh: m.id, TrustDomain: m.td,
		Certificate: func() (*tls.Certificate, error) { return m.cert, nil },
		Roots:       func() []*x509.Certificate { return m.ca.TrustAnchors() },
		Listener:    l, GossipPort: m.gossip, Gateways: []string{"10.9.0.1:15443"},
		Exports: m.exports, Imports: sinks{m.sink, m.feed}, PeerBundles: m.feed, Feed: m.feed, Store: m.store, StaleWindow: m.stale, RetryInterval: 100 * time.Millisecond,
		Metrics: m.reg, Now: func() time.Time { return time.Now().Add(time.Duration(m.clockOff.Load())) }})
	if err != nil {
		m.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.stop, m.done = cancel, make(chan error, 1)
	go func() { m.done <- m.ep.Run(ctx) }()
}

// kill stops the endpoint (its listener and pool close with it).
func (m *testMesh) kill() {
	if m.stop == nil {
		return
	}
	m.stop()
	if err := <-m.done; err != nil {
		m.t.Errorf("%s: Run: %v", m.id, err)
	}
	m.stop = nil
}

func (m *testMesh) export(svcs map[string][]mesh.MeshID) {
	var e []Export
	for k, to := range svcs {
		ns, name, _ := strings.Cut(k, "/")
		e = append(e, Export{Key: mesh.ServiceKey{Namespace: ns, Name: name}, Ports: []CatalogPort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}, Consumers: to})
	}
	m.exports.Set(e)
}

func (m *testMesh) waitState(name string, want State, timeout time.Duration) Peering {
	m.t.Helper()
	var p Peering
	eventually(m.t, timeout, fmt.Sprintf("%s: peering %s %s", m.id, name, want), func() error {
		var ok bool
		p, ok = m.ep.Peering(name)
		if !ok || p.State != want {
			return fmt.Errorf("%+v", p)
		}
		return nil
	})
	return p
}

func (m *testMesh) waitImports(peer mesh.MeshID, want ...string) time.Duration {
	m.t.Helper()
	start := time.Now()
	eventually(m.t, 10*time.Second, fmt.Sprintf("%s imports from %s", m.id, peer), func() error {
		if got := m.sink.hosts(peer); !slices.Equal(got, want) {
			return fmt.Errorf("got %v, want %v", got, want)
		}
		return nil
	})
	return time.Since(start)
}

func peerMeshes(t *testing.T, acceptor, dialer *testMesh, name string) {
	t.Helper()
	tok, err := acceptor.ep.CreateToken(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dialer.ep.Establish(context.Background(), tok, ""); err != nil {
		t.Fatal(err)
	}
}

// TestPeeringLifecycle peers two meshes by token on loopback (real CAs, real mTLS, real
// memberlist) and walks the design's lifecycle: export, unexport, a killed endpoint
// (FAILING, imports withdrawn, restored on return), delete (revoked at once on both
// sides) and establishing again with a new token.
func TestPeeringLifecycle(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}, "demo/secret": {"mesh-x"}})

	tok, err := a.ep.CreateToken("mesh-b")
	if err != nil {
		t.Fatal(err)
	}
	if p, _ := a.ep.Peering("mesh-b"); p.State != StatePending {
		t.Fatalf("after token create: %+v", p)
	}
	if _, err := b.ep.Establish(context.Background(), tok, ""); err != nil {
		t.Fatal(err)
	}
	b.waitState("mesh-a", StateActive, 10*time.Second)
	a.waitState("mesh-b", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus") // demo/secret is not exported to mesh-b
	if got := b.sink.hosts("mesh-a"); slices.Contains(got, "secret.demo.svc.mesh-a.isthmus") {
		t.Fatal("non-exported service imported")
	}
	if p, _ := a.ep.Peering("mesh-b"); p.Exported != 1 {
		t.Fatalf("acceptor counts %d exported", p.Exported)
	}

	// The same command run again on the dialer is answered with the peering it made.
	if p, err := b.ep.Establish(context.Background(), tok, ""); err != nil || p.Name != "mesh-a" || p.State == StateTerminated {
		t.Fatalf("establish retried with the same token: %+v %v", p, err)
	}
	if v := testutil.ToFloat64(a.ep.metrics.establishRefused.WithLabelValues("used")); v != 0 {
		t.Fatalf("a retried establish reached the acceptor: establish_refused{used} = %v", v)
	}

	// The token is one-time.
	if _, err := newTestMesh(t, "mesh-c", "c.example").ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reused token: %v", err)
	}
	if v := testutil.ToFloat64(a.ep.metrics.establishRefused.WithLabelValues("used")); v != 1 {
		t.Fatalf("establish_refused{used} = %v", v)
	}

	// Export and unexport propagate.
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}, "demo/other": {"mesh-b"}})
	d := b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus", "other.demo.svc.mesh-a.isthmus")
	t.Logf("export seen by the peer in %s", d.Round(time.Millisecond))
	a.export(map[string][]mesh.MeshID{"demo/other": {"mesh-b"}})
	d = b.waitImports("mesh-a", "other.demo.svc.mesh-a.isthmus")
	t.Logf("unexport seen by the peer in %s", d.Round(time.Millisecond))

	// The exporting endpoint dies: FAILING, imports withdrawn (stale window negative).
	killed := time.Now()
	a.kill()
	p := b.waitState("mesh-a", StateFailing, 5*time.Second)
	t.Logf("peer failure seen in %s: %s", time.Since(killed).Round(time.Millisecond), p.Reason)
	b.waitImports("mesh-a")
	// It returns (same store, same addresses): ACTIVE again, imports back.
	a.start()
	b.waitState("mesh-a", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "other.demo.svc.mesh-a.isthmus")

	// Delete on the acceptor: the dialer is refused, its imports go at once.
	if err := a.ep.Delete("mesh-b"); err != nil {
		t.Fatal(err)
	}
	b.waitImports("mesh-a")
	p = b.waitState("mesh-a", StateFailing, 5*time.Second)
	if !strings.Contains(p.Reason, "peering") {
		t.Logf("reason: %s", p.Reason)
	}
	// Establish again with a new token, after the dialer deletes its side too.
	if err := b.ep.Delete("mesh-a"); err != nil {
		t.Fatal(err)
	}
	peerMeshes(t, a, b, "mesh-b")
	b.waitState("mesh-a", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "other.demo.svc.mesh-a.isthmus")
	a.waitState("mesh-b", StateActive, 10*time.Second)
	if ps := a.ep.Peerings(); len(ps) != 2 || ps[0].State != StateActive || ps[1].State != StateTerminated {
		t.Fatalf("acceptor peerings: %+v", ps)
	}
}

// TestEstablishRefusals: expired, forged and conflicting establishes are refused with a
// precise error and nothing is recorded on either side.
func TestEstablishRefusals(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")

	t.Run("expired", func(t *testing.T) {
		tok, err := a.ep.CreateToken("late")
		if err != nil {
			t.Fatal(err)
		}
		b.clockOff.Store(int64(2 * time.Hour))
		defer b.clockOff.Store(0)
		if _, err := b.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("expired token: %v", err)
		}
		// The acceptor refuses it too, whatever the dialer's clock says.
		b.clockOff.Store(0)
		a.clockOff.Store(int64(2 * time.Hour))
		defer a.clockOff.Store(0)
		if _, err := b.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("acceptor accepted an expired token: %v", err)
		}
		if len(b.ep.Peerings()) != 0 {
			t.Fatalf("dialer recorded %+v", b.ep.Peerings())
		}
		_ = a.ep.Delete("late")
	})
	t.Run("forged secret", func(t *testing.T) {
		s, err := a.ep.CreateToken("forged")
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := ParseToken(s)
		tok.Secret[0] ^= 1
		forged, _ := tok.Encode()
		if _, err := b.ep.Establish(context.Background(), forged, ""); err == nil || !strings.Contains(err.Error(), "wrong secret") {
			t.Fatalf("forged secret: %v", err)
		}
		if p, _ := a.ep.Peering("forged"); p.State != StatePending {
			t.Fatalf("acceptor: %+v", p)
		}
		_ = a.ep.Delete("forged")
	})
	t.Run("bundle fingerprint", func(t *testing.T) {
		s, err := a.ep.CreateToken("pinned")
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := ParseToken(s)
		tok.BundleFingerprint = BundleFingerprint(roots(testRoot(t, "a.example")))
		bad, _ := tok.Encode()
		if _, err := b.ep.Establish(context.Background(), bad, ""); err == nil || !strings.Contains(err.Error(), "fingerprint") {
			t.Fatalf("wrong fingerprint: %v", err)
		}
		_ = a.ep.Delete("pinned")
	})
	t.Run("another mesh's trust domain", func(t *testing.T) {
		peerMeshes(t, a, b, "mesh-b")
		// mesh-c claims b.example, already peered: refused before anything is used up.
		c := newTestMesh(t, "mesh-c", "b.example")
		tok, err := a.ep.CreateToken("mesh-c")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "trust domain b.example is already peered") {
			t.Fatalf("duplicate trust domain: %v", err)
		}
		if v := testutil.ToFloat64(a.ep.metrics.establishRefused.WithLabelValues("conflict")); v != 1 {
			t.Fatalf("establish_refused{conflict} = %v", v)
		}
	})
	t.Run("trust domain its certificate does not prove", func(t *testing.T) {
		// mesh-d's CA is of c.example, but it claims d.example.
		d := newTestMesh(t, "mesh-d", "c.example")
		d.kill()
		d.td = "d.example"
		d.addr = fmt.Sprintf("127.0.0.1:%d", freePort(t)) // no peer knows d's address yet
		d.start()
		tok, err := a.ep.CreateToken("mesh-d")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := d.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "peer certificate is of trust domain c.example, want d.example") {
			t.Fatalf("unproven trust domain: %v", err)
		}
		if v := testutil.ToFloat64(a.ep.metrics.establishRefused.WithLabelValues("identity")); v != 1 {
			t.Fatalf("establish_refused{identity} = %v", v)
		}
		if p, _ := a.ep.Peering("mesh-d"); p.State != StatePending {
			t.Fatalf("acceptor changed the peering: %+v", p)
		}
	})
	t.Run("own mesh", func(t *testing.T) {
		tok, err := a.ep.CreateToken("self")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.ep.Establish(context.Background(), tok, "x"); err == nil || !strings.Contains(err.Error(), "own ID") {
			t.Fatalf("self-peering: %v", err)
		}
	})
}

// TestFederationOfThree: C peers with A after B did; all three share one pool, but B
// imports nothing C exports (no peering between B and C), and A sees C's failure.
func TestFederationOfThree(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	c := newTestMesh(t, "mesh-c", "c.example")
	c.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-a", "mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	peerMeshes(t, a, c, "mesh-c")
	a.waitState("mesh-c", StateActive, 10*time.Second)
	a.waitImports("mesh-c", "echo.demo.svc.mesh-c.isthmus")
	eventually(t, 10*time.Second, "one pool of three", func() error {
		for _, m := range []*testMesh{a, b, c} {
			if n := len(m.ep.Members()); n != 3 {
				return fmt.Errorf("%s sees %d members", m.id, n)
			}
		}
		return nil
	})
	if got := b.sink.hosts("mesh-c"); len(got) != 0 {
		t.Fatalf("mesh-b imports %v from mesh-c without a peering", got)
	}
	killed := time.Now()
	c.kill()
	a.waitState("mesh-c", StateFailing, 5*time.Second)
	t.Logf("failure of mesh-c seen by mesh-a in %s", time.Since(killed).Round(time.Millisecond))
	a.waitImports("mesh-c")
}

// TestEstablishReplay: a dialer that lost the acceptor's answer asks again with the same
// token and gets the same answer; another mesh with that token is still refused.
func TestEstablishReplay(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	c := newTestMesh(t, "mesh-c", "c.example")
	s, err := a.ep.CreateToken("mesh-b")
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := ParseToken(s)
	call := func(m *testMesh) (*establishResponse, error) {
		var raw []*x509.Certificate
		for _, der := range m.cert.Certificate {
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			raw = append(raw, cert)
		}
		ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: raw}}})
		return a.ep.establish(ctx, &establishRequest{PeeringID: tok.ID, Secret: tok.Secret, Mesh: m.id, TrustDomain: m.td,
			Addresses: []string{m.addr}, RootsPEM: rootsPEM(m.ca.TrustAnchors())})
	}
	first, err := call(b)
	if err != nil {
		t.Fatal(err)
	}
	again, err := call(b)
	if err != nil {
		t.Fatalf("replay by the same dialer: %v", err)
	}
	if first.FederationID != again.FederationID || string(first.FederationSecret) != string(again.FederationSecret) {
		t.Fatal("replay answered differently")
	}
	if _, err := call(c); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("another mesh with a used token: %v", err)
	}
	if p, _ := a.ep.Peering("mesh-b"); p.State != StateEstablishing || p.PeerMesh != "mesh-b" {
		t.Fatalf("acceptor: %+v", p)
	}
}

// TestEstablishGossipPortTaken: a dialer whose gossip pool cannot start (its port is
// taken by another socket) records nothing and says so, and the same token works once
// the port is free: no peering is left ESTABLISHING that blocks the retry, and the pool
// is started then.
func TestEstablishGossipPortTaken(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	tok, err := a.ep.CreateToken("mesh-b")
	if err != nil {
		t.Fatal(err)
	}
	// b's pool starts at its first Establish: take its gossip port (UDP, as memberlist
	// needs both) first.
	squat, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", b.gossip))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), "gossip") {
		squat.Close()
		t.Fatalf("establish with the gossip port taken: %v", err)
	}
	if ps := b.ep.Peerings(); len(ps) != 0 {
		squat.Close()
		t.Fatalf("dialer recorded %+v after a failed establish", ps)
	}
	squat.Close()
	if _, err := b.ep.Establish(context.Background(), tok, ""); err != nil {
		t.Fatalf("the same token once the port is free: %v", err)
	}
	b.waitState("mesh-a", StateActive, 20*time.Second)
	a.waitState("mesh-b", StateActive, 20*time.Second)

	// The acceptor's side: a token whose pool cannot start is not handed out and leaves
	// no PENDING peering behind.
	c := newTestMesh(t, "mesh-c", "c.example")
	squat, err = net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", c.gossip))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.ep.CreateToken("mesh-b"); err == nil || !strings.Contains(err.Error(), "gossip") {
		squat.Close()
		t.Fatalf("token with the gossip port taken: %v", err)
	}
	if ps := c.ep.Peerings(); len(ps) != 0 {
		squat.Close()
		t.Fatalf("acceptor recorded %+v after a failed token", ps)
	}
	squat.Close()
	if _, err := c.ep.CreateToken("mesh-b"); err != nil {
		t.Fatalf("the same peer's token once the port is free: %v", err)
	}
}
