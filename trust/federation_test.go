package trust

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// peerDomain is a test trust domain with a root, an intermediate and a bundle endpoint
// whose answer a test can switch.
type peerDomain struct {
	td    mesh.TrustDomain
	root  *Authority
	inter *Authority
	ep    *BundleEndpoint
	url   string
	id    mesh.Identity
	// mode selects the answer: "" the real bundle, else a fault.
	mode atomic.Value
	// body is served in mode "body".
	body atomic.Value
	l    net.Listener
}

func newPeerDomain(t *testing.T, td string) *peerDomain {
	t.Helper()
	root, err := NewRoot(mesh.TrustDomain(td), RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	p := &peerDomain{td: mesh.TrustDomain(td), root: root, inter: inter}
	var anchors atomic.Pointer[[]*x509.Certificate]
	a := []*x509.Certificate{root.Cert}
	anchors.Store(&a)
	p.ep, err = NewBundleEndpoint(BundleEndpointConfig{TrustDomain: p.td, Anchors: func() []*x509.Certificate { return *anchors.Load() }, RefreshHint: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	p.id, _ = EndpointIdentity(p.td, "istio-system")
	p.mode.Store("")
	p.body.Store([]byte(nil))
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch p.mode.Load().(string) {
		case "slow":
			select {
			case <-r.Context().Done():
			case <-time.After(time.Minute): // past any fetch timeout
			}
			return
		case "body":
			w.Write(p.body.Load().([]byte))
			return
		case "404":
			http.NotFound(w, r)
			return
		}
		p.ep.ServeHTTP(w, r)
	})
	tc := SPIFFETLSConfig(func() *Authority { return inter }, p.id)
	p.l, err = tls.Listen("tcp", "127.0.0.1:0", tc)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(p.l)
	t.Cleanup(func() { srv.Close() })
	p.url = "https://" + p.l.Addr().String() + "/"
	return p
}

func (p *peerDomain) bundleJSON(t *testing.T) string {
	t.Helper()
	b, err := p.ep.Refresh()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := b.Marshal()
	return string(raw)
}

func (p *peerDomain) relationship(t *testing.T) Relationship {
	return Relationship{TrustDomain: string(p.td), EndpointURL: p.url, Profile: ProfileSPIFFE, EndpointSPIFFEID: p.id.String(), BootstrapBundle: p.bundleJSON(t)}
}

// TestBundleEndpointServesGoSPIFFE: go-spiffe's own federation client fetches the endpoint
// over https_spiffe; the sequence goes up when the anchors change and the refresh hint is
// served.
func TestBundleEndpointServesGoSPIFFE(t *testing.T) {
	root, _ := NewRoot("east.example", RootOptions{})
	inter, _ := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	next, _ := NewRoot("east.example", RootOptions{})
	var mu sync.Mutex
	anchors := []*x509.Certificate{root.Cert}
	reg := prometheus.NewRegistry()
	ep, err := NewBundleEndpoint(BundleEndpointConfig{TrustDomain: "east.example", RefreshHint: 7 * time.Second, Sequence: 41, Metrics: reg,
		Anchors: func() []*x509.Certificate { mu.Lock(); defer mu.Unlock(); return anchors }})
	if err != nil {
		t.Fatal(err)
	}
	id, _ := EndpointIdentity("east.example", "istio-system")
	l, err := tls.Listen("tcp", "127.0.0.1:0", SPIFFETLSConfig(func() *Authority { return inter }, id))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: ep}
	go srv.Serve(l)
	defer srv.Close()
	url := "https://" + l.Addr().String() + "/"
	td := spiffeid.RequireTrustDomainFromString("east.example")
	sid := spiffeid.RequireFromString(id.String())
	bootstrap := spiffebundle.FromX509Authorities(td, []*x509.Certificate{root.Cert})
	fetch := func() *spiffebundle.Bundle {
		t.Helper()
		b, err := federation.FetchBundle(context.Background(), td, url, federation.WithSPIFFEAuth(bootstrap, sid))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	b := fetch()
	if seq, _ := b.SequenceNumber(); seq != 41 {
		t.Errorf("sequence %d, want 41", seq)
	}
	if h, _ := b.RefreshHint(); h != 7*time.Second {
		t.Errorf("refresh hint %s, want 7s", h)
	}
	mu.Lock()
	anchors = []*x509.Certificate{root.Cert, next.Cert} // a rotation publishes a new root
	mu.Unlock()
	b = fetch()
	if seq, _ := b.SequenceNumber(); seq != 42 || len(b.X509Authorities()) != 2 {
		t.Errorf("after a change: sequence %d with %d roots, want 42 with 2", seq, len(b.X509Authorities()))
	}
	fetch()
	if seq := ep.Status().Sequence; seq != 42 {
		t.Errorf("unchanged anchors bumped the sequence to %d", seq)
	}
	if got := testutil.ToFloat64(ep.served.WithLabelValues("200")); got != 3 {
		t.Errorf("served 200 = %v, want 3", got)
	}
	if got := testutil.ToFloat64(ep.sequence); got != 42 {
		t.Errorf("sequence gauge = %v, want 42", got)
	}
	// An endpoint with the wrong SPIFFE ID is refused by go-spiffe too.
	wrong := spiffeid.RequireFromString("spiffe://east.example/ns/x/sa/y")
	if _, err := federation.FetchBundle(context.Background(), td, url, federation.WithSPIFFEAuth(bootstrap, wrong)); err == nil {
		t.Error("go-spiffe accepted an endpoint with another SPIFFE ID")
	}
}

// TestBundleEndpointWebProfile: the same handler over a Web PKI certificate (https_web).
func TestBundleEndpointWebProfile(t *testing.T) {
	root, _ := NewRoot("west.example", RootOptions{})
	web, _ := NewRoot("web-ca.example", RootOptions{})
	certs, key, err := web.IssueServing([]string{"localhost"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	kp := tls.Certificate{PrivateKey: key}
	for _, c := range certs {
		cs, _ := parseCerts(c)
		kp.Certificate = append(kp.Certificate, cs[0].Raw)
	}
	ep, _ := NewBundleEndpoint(BundleEndpointConfig{TrustDomain: "west.example", Anchors: func() []*x509.Certificate { return []*x509.Certificate{root.Cert} }})
	url := serveTLS(t, kp, ep)
	url = strings.Replace(url, "127.0.0.1", "localhost", 1)
	w, err := newPeerWatcher(Relationship{TrustDomain: "west.example", EndpointURL: url, Profile: ProfileWeb, EndpointCA: string(web.RootPEM())},
		5*time.Second, time.Second, time.Hour, func(string) {}, func(*spiffebundle.Bundle) {})
	if err != nil {
		t.Fatal(err)
	}
	b, reason, err := w.fetch(context.Background())
	if err != nil || reason != ReasonOK || !b.X509Authorities()[0].Equal(root.Cert) {
		t.Fatalf("https_web fetch: %v (%s)", err, reason)
	}
}

// TestPeerWatcherRefusals: every bad answer is refused with its reason, and the last good
// bundle stays in force.
func TestPeerWatcherRefusals(t *testing.T) {
	p := newPeerDomain(t, "west.example")
	other := newPeerDomain(t, "other.example")
	good := p.bundleJSON(t)
	lower := func() string { // a valid bundle with sequence 0
		b := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("west.example"), []*x509.Certificate{p.root.Cert})
		b.SetSequenceNumber(0)
		raw, _ := b.Marshal()
		return string(raw)
	}()
	goodBundle, _ := ParsePeerBundle("west.example", []byte(good))
	goodSeq, _ := goodBundle.SequenceNumber()
	rel := p.relationship(t)
	rel.BootstrapBundle = good
	cases := []struct {
		name, mode, body, reason string
		rel                      func(Relationship) Relationship
	}{
		{name: "malformed JSON", mode: "body", body: `{"keys": [`, reason: ReasonMalformed},
		{name: "not a bundle", mode: "body", body: `<html>oops</html>`, reason: ReasonMalformed},
		{name: "no X.509 roots", mode: "body", body: `{"keys": []}`, reason: ReasonMalformed},
		{name: "bundle of another trust domain", mode: "body", body: other.bundleJSON(t), reason: ReasonWrongTrustDomain},
		{name: "lower sequence", mode: "body", body: lower, reason: ReasonLowerSequence},
		{name: "HTTP 404", mode: "404", reason: ReasonHTTPStatus},
		{name: "slow", mode: "slow", reason: ReasonTimeout},
		{name: "wrong endpoint SPIFFE ID", reason: ReasonEndpointID, rel: func(r Relationship) Relationship {
			r.EndpointSPIFFEID = "spiffe://west.example/ns/istio-system/sa/someone-else"
			return r
		}},
		{name: "endpoint signed by another domain", reason: ReasonTLS, rel: func(r Relationship) Relationship {
			r.EndpointURL, r.EndpointSPIFFEID = other.url, strings.Replace(other.id.String(), "other.example", "west.example", 1)
			return r
		}},
		{name: "down", reason: ReasonUnreachable, rel: func(r Relationship) Relationship {
			l, _ := net.Listen("tcp", "127.0.0.1:0")
			r.EndpointURL = "https://" + l.Addr().String() + "/"
			l.Close()
			return r
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := rel
			if c.rel != nil {
				r = c.rel(r)
			}
			var results []string
			accepted := 0
			// 5 s: long enough that a handshake on a loaded machine is never the
			// timeout the cases other than "slow" would then report instead.
			w, err := newPeerWatcher(r, 5*time.Second, time.Second, time.Hour, func(s string) { results = append(results, s) }, func(*spiffebundle.Bundle) { accepted++ })
			if err != nil {
				t.Fatal(err)
			}
			p.mode.Store(c.mode)
			p.body.Store([]byte(c.body))
			defer p.mode.Store("")
			w.fetchOnce(context.Background())
			st := w.Status()
			if len(results) != 1 || results[0] != c.reason || st.LastErrorReason != c.reason {
				t.Fatalf("result %v, status reason %q (%s), want %s", results, st.LastErrorReason, st.LastError, c.reason)
			}
			if accepted != 0 || st.Sequence != goodSeq || w.InForce() == nil || !w.InForce().X509Authorities()[0].Equal(p.root.Cert) {
				t.Fatalf("the last good bundle is not in force: %+v", st)
			}
			if st.LastError == "" || !strings.Contains(st.LastError, "west.example") {
				t.Errorf("error %q does not name the peer", st.LastError)
			}
			t.Logf("%s: %s", c.reason, st.LastError)
			// The endpoint healed: the next fetch is accepted.
			p.mode.Store("")
			if r.EndpointURL == rel.EndpointURL && r.EndpointSPIFFEID == rel.EndpointSPIFFEID {
				w.fetchOnce(context.Background())
				if st := w.Status(); st.State != "ok" || accepted != 1 {
					t.Errorf("after healing: state %s, accepted %d (%s)", st.State, accepted, st.LastError)
				}
			}
		})
	}
}

// TestFederationKeepsTheStore: relationships in the ConfigMap start watchers, accepted
// bundles land in the bundle store under their own domain, a removed relationship takes
// its bundle out; refused relationship changes write nothing.
func TestFederationKeepsTheStore(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client := fake.NewClientset()
	local := newPeerDomain(t, "east.example")
	west := newPeerDomain(t, "west.example")
	fs := FederationStore{Client: client, Namespace: "istio-system"}
	// Refusals write nothing.
	bad := west.relationship(t)
	bad.EndpointURL = "http://plain.example/"
	if _, err := fs.Update(ctx, func(r []Relationship) ([]Relationship, error) { return AddRelationship(r, bad, "east.example") }); err == nil {
		t.Fatal("an http:// endpoint was accepted")
	}
	if _, err := fs.Update(ctx, func(r []Relationship) ([]Relationship, error) {
		return AddRelationship(r, local.relationship(t), "east.example")
	}); err == nil {
		t.Fatal("a relationship with the local domain was accepted")
	}
	if _, err := client.CoreV1().ConfigMaps("istio-system").Get(ctx, FederationConfigMap, metav1.GetOptions{}); err == nil {
		t.Fatal("a refused change created the ConfigMap")
	}
	reg := prometheus.NewRegistry()
	f, err := NewFederation(FederationConfig{TrustDomain: "east.example", Client: client, Namespace: "istio-system", Endpoint: local.ep, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	go f.Run(ctx)
	if _, err := fs.Update(ctx, func(r []Relationship) ([]Relationship, error) {
		return AddRelationship(r, west.relationship(t), "east.example")
	}); err != nil {
		t.Fatal(err)
	}
	store := BundleStore{Client: client, Namespace: "istio-system"}
	waitStore := func(what string, ok func(*BundleSet) bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			set, err := store.Load(ctx)
			if err == nil && ok(set) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: store %v (err %v); federation %+v", what, set.Domains(), err, f.Status())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitStore("west's bundle and the local one stored", func(s *BundleSet) bool {
		_, w := s.Get("west.example")
		_, e := s.Get("east.example")
		return w && e
	})
	deadline := time.Now().Add(10 * time.Second)
	for p := f.Status().Peers[0]; p.State != "ok" || !p.Stored; p = f.Status().Peers[0] {
		if time.Now().After(deadline) {
			t.Fatalf("peer never fetched, or its bundle never reported stored: %+v", p)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := testutil.ToFloat64(f.fetches.WithLabelValues("west.example", ReasonOK)); got < 1 {
		t.Errorf("fetches ok = %v", got)
	}
	if n, err := testutil.GatherAndCount(reg, "isthmus_trust_federation_bundle_sequence", "isthmus_trust_federation_bundle_age_seconds"); err != nil || n != 2 {
		t.Errorf("peer gauges: %d (%v)", n, err)
	}
	if _, err := fs.Update(ctx, func(r []Relationship) ([]Relationship, error) { return RemoveRelationship(r, "west.example") }); err != nil {
		t.Fatal(err)
	}
	waitStore("west's bundle removed", func(s *BundleSet) bool {
		_, w := s.Get("west.example")
		_, e := s.Get("east.example")
		return !w && e
	})
	if len(f.Status().Peers) != 0 {
		t.Errorf("peers after removal: %+v", f.Status().Peers)
	}
}

// FuzzParsePeerBundle: arbitrary endpoint answers never panic, and an accepted one has
// roots of the domain only.
func FuzzParsePeerBundle(f *testing.F) {
	root, _ := NewRoot("west.example", RootOptions{})
	b, _ := LocalBundle(root, 3, time.Minute)
	raw, _ := b.Marshal()
	f.Add(raw)
	f.Add([]byte(`{"keys":[]}`))
	f.Add([]byte(`{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AAAA"]}],"spiffe_sequence":-1}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParsePeerBundle("west.example", data)
		if err != nil {
			return
		}
		if len(b.X509Authorities()) == 0 {
			t.Fatal("accepted a bundle without roots")
		}
	})
}

// FuzzParseRelationships: arbitrary ConfigMap content never panics; what is accepted
// renders and parses back the same.
func FuzzParseRelationships(f *testing.F) {
	f.Add(`[{"trustDomain":"west.example","endpointURL":"https://b.west.example/","profile":"https_web"}]`)
	f.Add(`[{"trustDomain":"west.example","endpointURL":"https://b/","profile":"https_spiffe","endpointSPIFFEID":"spiffe://west.example/x","bootstrapBundle":"{}"}]`)
	f.Add(`not json`)
	f.Fuzz(func(t *testing.T, s string) {
		rels, err := ParseRelationships(map[string]string{relationshipsKey: s})
		if err != nil {
			return
		}
		data, err := RelationshipsData(rels)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseRelationships(data)
		if err != nil || len(again) != len(rels) {
			t.Fatalf("round trip: %v, %d vs %d", err, len(again), len(rels))
		}
	})
}

// TestBundleMapWriter: the local roots come from the CA, peers from the store, aliases as
// their target's roots; the file is rewritten only when the bundles change.
func TestBundleMapWriter(t *testing.T) {
	east := newPeerDomain(t, "east.example")
	west := newPeerDomain(t, "west.example")
	peers := NewBundleSet()
	writes := 0
	w := &BundleMapWriter{Path: t.TempDir() + "/" + AgentBundleMapFile, Peers: peers, OnWrite: func([]byte) { writes++ }}
	if err := w.Update(); err != nil || writes != 0 {
		t.Fatalf("wrote before the first certificate: %v", err)
	}
	if err := w.SetLocal("east.example", east.root.RootPEM()); err != nil {
		t.Fatal(err)
	}
	wb, _ := ParsePeerBundle("west.example", []byte(west.bundleJSON(t)))
	peers.Set(wb)
	peers.SetAlias("old-west.example", "west.example")
	// A stale store entry for the local domain never replaces the CA's roots.
	stale := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString("east.example"), []*x509.Certificate{west.root.Cert})
	peers.Set(stale)
	if err := w.Update(); err != nil {
		t.Fatal(err)
	}
	if err := w.Update(); err != nil || writes != 2 {
		t.Fatalf("writes %d, want 2 (unchanged bundles are not written again): %v", writes, err)
	}
	data, err := os.ReadFile(w.Path)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseBundleMap(data)
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 3 || !m["east.example"].X509Authorities()[0].Equal(east.root.Cert) || !m["old-west.example"].X509Authorities()[0].Equal(west.root.Cert) {
		t.Fatalf("bundle map %v", m)
	}
	leaf := svid(t, west.inter, "spiffe://west.example/ns/demo/sa/echo")
	if id, err := w.Bundles().VerifyPeer(leaf.Certificate); err != nil || id.String() != "spiffe://west.example/ns/demo/sa/echo" {
		t.Fatalf("west's identity: %v %v", id, err)
	}
	peers.Remove("west.example")
	peers.RemoveAlias("old-west.example")
	w.Update()
	if _, err := w.Bundles().VerifyPeer(leaf.Certificate); err == nil {
		t.Fatal("west still verifies after its bundle left the store")
	}
}
