package federation

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// The refusals of docs/federation.md ("Refusals"), end to end on in-process meshes: each
// bad input is refused with a precise error, counted, and changes nothing.

func counter(t *testing.T, v float64, want float64, what string) {
	t.Helper()
	if v != want {
		t.Fatalf("%s = %v, want %v", what, v, want)
	}
}

// TestTokenRefusalsCounted: truncated, forged, expired and reused tokens are refused by
// whichever side can tell, each counted where it is refused, and neither side records
// anything.
func TestTokenRefusalsCounted(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	dialer := func(reason string) float64 {
		return testutil.ToFloat64(b.ep.metrics.tokenRefused.WithLabelValues(reason))
	}
	acceptor := func(reason string) float64 {
		return testutil.ToFloat64(a.ep.metrics.establishRefused.WithLabelValues(reason))
	}
	unchanged := func(t *testing.T, name string) {
		t.Helper()
		if ps := b.ep.Peerings(); len(ps) != 0 {
			t.Fatalf("dialer recorded %+v", ps)
		}
		if p, ok := a.ep.Peering(name); !ok || p.State != StatePending {
			t.Fatalf("acceptor's peering changed: %+v", p)
		}
	}

	// Every later subtest starts from what this one leaves: b's peering of a deleted.
	if !t.Run("truncated", func(t *testing.T) {
		tok, err := a.ep.CreateToken("cut")
		if err != nil {
			t.Fatal(err)
		}
		for i, bad := range []string{tok[:len(tok)-1], tok[:len(tok)-40], tok[:len(TokenPrefix)+10]} {
			if _, err := b.ep.Establish(context.Background(), bad, ""); err == nil || !strings.Contains(err.Error(), "truncated") {
				t.Fatalf("cut %d: %v", i, err)
			}
		}
		counter(t, dialer("malformed"), 3, `token_refused{malformed}`)
		unchanged(t, "cut")
		// The whole token still works afterwards: nothing was used up.
		if _, err := b.ep.Establish(context.Background(), tok, ""); err != nil {
			t.Fatal(err)
		}
		b.waitState("mesh-a", StateActive, 10*time.Second)
		if err := b.ep.Delete("mesh-a"); err != nil {
			t.Fatal(err)
		}
		if err := a.ep.Delete("cut"); err != nil {
			t.Fatal(err)
		}
	}) {
		t.FailNow()
	}
	before := len(b.ep.Peerings())
	noNew := func(t *testing.T, name string) {
		t.Helper()
		if n := len(b.ep.Peerings()); n != before {
			t.Fatalf("dialer recorded %+v", b.ep.Peerings())
		}
		if p, ok := a.ep.Peering(name); !ok || p.State != StatePending {
			t.Fatalf("acceptor's peering changed: %+v", p)
		}
	}

	t.Run("forged tag", func(t *testing.T) {
		tok, err := a.ep.CreateToken("tagged")
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(tok, TokenPrefix))
		raw[len(raw)-1] ^= 1
		if _, err := b.ep.Establish(context.Background(), TokenPrefix+base64.RawURLEncoding.EncodeToString(raw), ""); err == nil || !strings.Contains(err.Error(), "integrity check failed") {
			t.Fatalf("forged tag: %v", err)
		}
		counter(t, dialer("malformed"), 4, `token_refused{malformed}`)
		noNew(t, "tagged")
	})
	t.Run("forged secret", func(t *testing.T) {
		s, err := a.ep.CreateToken("guessed")
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := ParseToken(s)
		tok.Secret[5] ^= 0x40
		forged, _ := tok.Encode() // resealed: only the acceptor can tell
		if _, err := b.ep.Establish(context.Background(), forged, ""); err == nil || !strings.Contains(err.Error(), `wrong secret for peering "guessed"`) {
			t.Fatalf("forged secret: %v", err)
		}
		counter(t, acceptor("secret"), 1, `establish_refused{secret}`)
		counter(t, dialer("peer"), 1, `token_refused{peer}`)
		noNew(t, "guessed")
	})
	t.Run("forged addresses", func(t *testing.T) {
		// A token resealed to point at another mesh's endpoint: the bundle there is not
		// the one the token pins.
		other := newTestMesh(t, "mesh-o", "o.example")
		s, err := a.ep.CreateToken("redirected")
		if err != nil {
			t.Fatal(err)
		}
		tok, _ := ParseToken(s)
		tok.Addresses = []string{other.addr}
		forged, _ := tok.Encode()
		if _, err := b.ep.Establish(context.Background(), forged, ""); err == nil || !strings.Contains(err.Error(), "fingerprint") {
			t.Fatalf("redirected token: %v", err)
		}
		counter(t, dialer("bundle"), 1, `token_refused{bundle}`)
		noNew(t, "redirected")
	})
	t.Run("expired", func(t *testing.T) {
		tok, err := a.ep.CreateToken("late")
		if err != nil {
			t.Fatal(err)
		}
		b.clockOff.Store(int64(2 * time.Hour))
		_, err = b.ep.Establish(context.Background(), tok, "")
		b.clockOff.Store(0)
		if err == nil || !strings.Contains(err.Error(), "token expired at") {
			t.Fatalf("expired on the dialer's clock: %v", err)
		}
		counter(t, dialer("expired"), 1, `token_refused{expired}`)
		a.clockOff.Store(int64(2 * time.Hour))
		_, err = b.ep.Establish(context.Background(), tok, "")
		a.clockOff.Store(0)
		// Refused at the handshake ("expired at …") or already terminated by the
		// acceptor's expiry sweep ("token expired unused"): expired either way.
		if err == nil || !strings.Contains(err.Error(), `token of peering "late"`) || !strings.Contains(err.Error(), "expired") {
			t.Fatalf("expired on the acceptor's clock: %v", err)
		}
		counter(t, acceptor("expired"), 1, `establish_refused{expired}`)
		counter(t, dialer("peer"), 2, `token_refused{peer}`)
		if n := len(b.ep.Peerings()); n != before {
			t.Fatalf("dialer recorded %+v", b.ep.Peerings())
		}
		// The acceptor's peering is PENDING or, once its expiry sweep ran, TERMINATED as
		// expired; never established.
		if p, _ := a.ep.Peering("late"); p.State != StatePending && (p.State != StateTerminated || !strings.Contains(p.Reason, "expired")) {
			t.Fatalf("acceptor's peering: %+v", p)
		}
	})
	t.Run("reused", func(t *testing.T) {
		tok, err := a.ep.CreateToken("once")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.ep.Establish(context.Background(), tok, ""); err != nil {
			t.Fatal(err)
		}
		c := newTestMesh(t, "mesh-c", "c.example")
		if _, err := c.ep.Establish(context.Background(), tok, ""); err == nil || !strings.Contains(err.Error(), `token of peering "once" already used`) {
			t.Fatalf("reused token: %v", err)
		}
		counter(t, acceptor("used"), 1, `establish_refused{used}`)
		counter(t, testutil.ToFloat64(c.ep.metrics.tokenRefused.WithLabelValues("peer")), 1, `mesh-c token_refused{peer}`)
		if ps := c.ep.Peerings(); len(ps) != 0 {
			t.Fatalf("second dialer recorded %+v", ps)
		}
		if p, _ := a.ep.Peering("once"); p.PeerMesh != "mesh-b" {
			t.Fatalf("the reuse changed the peering: %+v", p)
		}
	})
}

// watchAs opens a catalog stream to m's endpoint presenting cert (nil: none) and asking
// as mesh asMesh, and returns the error of the first receive.
func watchAs(t *testing.T, m *testMesh, cert *tls.Certificate, asMesh mesh.MeshID) error {
	t.Helper()
	var get func() (*tls.Certificate, error)
	if cert != nil {
		get = func() (*tls.Certificate, error) { return cert, nil }
	}
	conn, err := dial(m.addr, verifyingTLS(m.ca.TrustAnchors(), m.td, get))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, methodWatch)
	if err != nil {
		return err
	}
	if err := stream.SendMsg(&watchRequest{Mesh: asMesh}); err != nil {
		return err
	}
	_ = stream.CloseSend()
	var f rawFrame
	if err := stream.RecvMsg(&f); err != nil {
		return err
	}
	return fmt.Errorf("got a catalog: %s", f.b)
}

// endpointCert issues a federation endpoint certificate from a fresh CA of td: a mesh
// that claims td without holding its CA.
func endpointCert(t *testing.T, td mesh.TrustDomain) *tls.Certificate {
	t.Helper()
	ca, err := testRoot(t, td).NewIntermediate(trust.IntermediateOptions{Cluster: "impostor"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := IssueEndpointCertificate(context.Background(), ca, "istio-system", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStreamRefusesImpostorClients: a catalog stream is served only to a client whose
// certificate chains to the bundle of a live peering and who names the mesh that
// peering's trust domain is bound to.
func TestStreamRefusesImpostorClients(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	a.waitState("mesh-b", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")
	refused := func(reason string) float64 {
		return testutil.ToFloat64(a.ep.metrics.streamRefused.WithLabelValues("server", reason))
	}
	for _, c := range []struct {
		name   string
		cert   *tls.Certificate
		as     mesh.MeshID
		code   codes.Code
		reason string
		msg    string
	}{
		{"no certificate", nil, "mesh-b", codes.Unauthenticated, "certificate", "no client certificate"},
		{"mesh-b's certificate claiming another mesh ID", b.cert, "mesh-c", codes.PermissionDenied, ReasonMesh, "trust domain b.example is peered as mesh mesh-b, not mesh-c"},
		{"b.example from another CA", endpointCert(t, "b.example"), "mesh-b", codes.PermissionDenied, "bundle", "does not chain to the peering's bundle"},
		{"a trust domain not peered", endpointCert(t, "c.example"), "mesh-c", codes.PermissionDenied, ReasonTrustDomain, "no peering with trust domain c.example"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := watchAs(t, a, c.cert, c.as)
			if status.Code(err) != c.code || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want %s mentioning %q", err, c.code, c.msg)
			}
			counter(t, refused(c.reason), 1, fmt.Sprintf("stream_refused{server,%s}", c.reason))
		})
	}
	// The real peer was not disturbed.
	if p, _ := a.ep.Peering("mesh-b"); p.State != StateActive {
		t.Fatalf("acceptor: %+v", p)
	}
	if err := watchAs(t, a, b.cert, "mesh-b"); err == nil || !strings.Contains(err.Error(), "got a catalog") {
		t.Fatalf("the real peer's own stream: %v", err)
	}
}

// TestStreamRefusesImpostorServer: whoever answers at a peer's address must prove the
// peering's trust domain with its bundle. An impostor (a's mesh ID and trust domain with
// another CA; or another trust domain) is refused at the TLS handshake and counted; its
// catalog is never read, and the held imports stay (stale window).
func TestStreamRefusesImpostorServer(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMeshStale(t, "mesh-b", "b.example", time.Hour)
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	b.waitState("mesh-a", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")
	addr := a.addr
	a.kill()
	for _, c := range []struct {
		td     mesh.TrustDomain
		reason string
		msg    string
	}{
		{"a.example", "bundle", "does not chain to the peering's bundle"},
		{"x.example", ReasonTrustDomain, "peer certificate is of trust domain x.example, want a.example"},
	} {
		t.Run(string(c.td), func(t *testing.T) {
			imp := newTestMeshStale(t, "mesh-a", c.td, time.Hour)
			imp.kill()
			imp.addr = addr
			imp.start()
			imp.export(map[string][]mesh.MeshID{"demo/evil": {"mesh-b"}})
			eventually(t, 20*time.Second, "impostor refused", func() error {
				if v := testutil.ToFloat64(b.ep.metrics.streamRefused.WithLabelValues("client", c.reason)); v == 0 {
					return fmt.Errorf("stream_refused{client,%s} is 0", c.reason)
				}
				p, _ := b.ep.Peering("mesh-a")
				if p.State != StateFailing || !strings.Contains(p.Reason, c.msg) {
					return fmt.Errorf("peering %s: %s", p.State, p.Reason)
				}
				return nil
			})
			if got := b.sink.hosts("mesh-a"); !slices.Equal(got, []string{"echo.demo.svc.mesh-a.isthmus"}) {
				t.Fatalf("imports after the impostor: %v", got)
			}
			imp.kill()
		})
	}
	// The real one returns: ACTIVE again.
	a.start()
	b.waitState("mesh-a", StateActive, 20*time.Second)
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")
}

// TestCatalogRefusedAtTheEndpoint feeds the importer's stream handler catalogs a
// misbehaving peer could send: another mesh's ID or trust domain refuses the catalog
// whole (imports kept), an entry not exported to us is refused alone (the rest applied);
// each is counted and said in the peering.
func TestCatalogRefusedAtTheEndpoint(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	b.waitState("mesh-a", StateActive, 10*time.Second)
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")
	p, _ := b.ep.Peering("mesh-a")
	seq := p.CatalogSequence
	send := func(c *Catalog, proved mesh.TrustDomain) Peering {
		t.Helper()
		seq++
		c.Sequence = seq
		buf, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		b.ep.onCatalog("mesh-a", p.ID, buf, proved)
		q, _ := b.ep.Peering("mesh-a")
		return q
	}
	svc := func(name string, to ...mesh.MeshID) ExportedService {
		return ExportedService{Namespace: "demo", Name: name, Ports: []CatalogPort{{Name: "grpc", Port: 8080}}, Gateways: []string{"10.9.0.1:15443"}, Consumers: to}
	}
	refused := func(reason string) float64 {
		return testutil.ToFloat64(b.ep.metrics.catalogRefused.WithLabelValues("mesh-a", reason))
	}
	whole := []struct {
		name   string
		c      *Catalog
		proved mesh.TrustDomain
		reason string
		msg    string
	}{
		{"another mesh's ID", &Catalog{Mesh: "mesh-c", TrustDomain: "a.example", Services: []ExportedService{svc("evil", "mesh-b")}}, "a.example", ReasonMesh, "peer mesh-a sent a catalog of mesh mesh-c"},
		{"another trust domain", &Catalog{Mesh: "mesh-a", TrustDomain: "c.example", Services: []ExportedService{svc("evil", "mesh-b")}}, "a.example", ReasonTrustDomain, "claiming trust domain c.example"},
		{"stream proved another domain", &Catalog{Mesh: "mesh-a", TrustDomain: "a.example", Services: []ExportedService{svc("evil", "mesh-b")}}, "c.example", ReasonTrustDomain, `stream proved trust domain "c.example"`},
	}
	for _, c := range whole {
		t.Run(c.name, func(t *testing.T) {
			before := refused(c.reason)
			q := send(c.c, c.proved)
			if !strings.Contains(q.ImportError, c.msg) {
				t.Fatalf("import error %q, want %q", q.ImportError, c.msg)
			}
			counter(t, refused(c.reason), before+1, fmt.Sprintf("catalog_refused{%s}", c.reason))
			if got := b.sink.hosts("mesh-a"); !slices.Equal(got, []string{"echo.demo.svc.mesh-a.isthmus"}) {
				t.Fatalf("imports: %v", got)
			}
		})
	}
	t.Run("entry not exported to us", func(t *testing.T) {
		q := send(&Catalog{Mesh: "mesh-a", TrustDomain: "a.example", Services: []ExportedService{
			svc("echo", "mesh-b"), svc("other", "mesh-b", "mesh-c"), svc("secret", "mesh-c"),
		}}, "a.example")
		b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus", "other.demo.svc.mesh-a.isthmus")
		counter(t, refused(ReasonNotExported), 1, "catalog_refused{not_exported}")
		if !strings.Contains(q.ImportError, "1 of 3 catalog entries refused") || !strings.Contains(q.ImportError, "demo/secret, which it does not export to mesh-b") {
			t.Fatalf("import error %q", q.ImportError)
		}
		if q.Imported != 2 {
			t.Fatalf("imported %d", q.Imported)
		}
		// A good catalog clears the error.
		q = send(&Catalog{Mesh: "mesh-a", TrustDomain: "a.example", Services: []ExportedService{svc("echo", "mesh-b")}}, "a.example")
		if q.ImportError != "" {
			t.Fatalf("import error kept: %q", q.ImportError)
		}
		b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")
	})
}

// TestEndpointGossipRefusesForeign: a member of another federation (its label), one
// holding another keyring, and one gossiping in the clear are all refused at a running
// endpoint's pool, counted in its registry, and never become members on either side.
func TestEndpointGossipRefusesForeign(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	peerMeshes(t, a, b, "mesh-b")
	a.waitState("mesh-b", StateActive, 10*time.Second)
	eventually(t, 10*time.Second, "pool of two", func() error {
		if n := len(a.ep.Members()); n != 2 {
			return fmt.Errorf("%d members", n)
		}
		return nil
	})
	a.ep.mu.Lock()
	fed, secret, gossip := a.ep.state.FederationID, a.ep.state.FederationSecret, a.ep.pool.Addr()
	a.ep.mu.Unlock()
	refused := func(reason string) float64 {
		mfs, err := a.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "isthmus_federation_gossip_refused_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "reason" && l.GetValue() == reason {
						return m.GetCounter().GetValue()
					}
				}
			}
		}
		return 0
	}
	for _, c := range []struct {
		name   string
		start  func(t *testing.T) (join func([]string) error, members func() int)
		reason string
	}{
		{"another federation's label", func(t *testing.T) (func([]string) error, func() int) {
			p := startPool(t, "mesh-x", "another-federation", secret, nil, nil)
			return p.Join, func() int { return len(p.Members()) }
		}, "label"},
		{"a foreign keyring", func(t *testing.T) (func([]string) error, func() int) {
			p := startPool(t, "mesh-y", fed, bytes.Repeat([]byte{3}, 32), nil, nil)
			return p.Join, func() int { return len(p.Members()) }
		}, "keyring"},
		{"plaintext with the right label", func(t *testing.T) (func([]string) error, func() int) {
			mc := memberlist.DefaultLANConfig()
			mc.Name, mc.BindAddr, mc.BindPort, mc.Label = "mesh-z", "127.0.0.1", 0, PoolLabel(fed)
			mc.Logger = log.New(io.Discard, "", 0)
			ml, err := memberlist.Create(mc)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = ml.Shutdown() })
			return func(addrs []string) error { _, err := ml.Join(addrs); return err }, ml.NumMembers
		}, "keyring"},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := refused(c.reason)
			join, members := c.start(t)
			if err := join([]string{gossip}); err == nil {
				t.Fatal("joined the federation's pool")
			}
			eventually(t, 10*time.Second, "refusal counted", func() error {
				if v := refused(c.reason); v <= before {
					return fmt.Errorf("gossip_refused{%s} = %v", c.reason, v)
				}
				return nil
			})
			if n := len(a.ep.Members()); n != 2 {
				t.Fatalf("mesh-a's pool has %d members: %+v", n, a.ep.Members())
			}
			if n := members(); n != 1 {
				t.Fatalf("the foreign member sees %d members", n)
			}
		})
	}
}
