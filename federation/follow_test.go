package federation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// exportSink records the last export set.
type exportSink struct {
	mu  sync.Mutex
	got ExportSet
}

func (e *exportSink) SetExportSet(x ExportSet) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.got = x
}

func (e *exportSink) get() ExportSet {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.got
}

// bundleSink records the last bundles set.
type bundleSink struct {
	mu  sync.Mutex
	got map[mesh.TrustDomain]string
}

func (b *bundleSink) SetPeerBundles(m map[mesh.TrustDomain]string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.got = maps.Clone(m)
}

func (b *bundleSink) domains() []mesh.TrustDomain {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Sorted(maps.Keys(b.got))
}

// testFollower is another primary of m's mesh (its own intermediate of m's root)
// following address.
type testFollower struct {
	f       *Follower
	sink    *sink
	bundles *bundleSink
	exports *exportSink
	reg     *prometheus.Registry
	stop    context.CancelFunc
	done    chan error
}

func newTestFollower(t *testing.T, m *testMesh, address string, cert *tls.Certificate, stale time.Duration) *testFollower {
	t.Helper()
	if cert == nil {
		ca, err := m.root.NewIntermediate(trust.IntermediateOptions{Cluster: mesh.ClusterID(string(m.id) + "-c2")})
		if err != nil {
			t.Fatal(err)
		}
		if cert, err = IssueEndpointCertificate(context.Background(), ca, "istio-system", time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	tf := &testFollower{sink: &sink{}, bundles: &bundleSink{}, exports: &exportSink{}, reg: prometheus.NewRegistry(), done: make(chan error, 1)}
	var err error
	tf.f, err = NewFollower(FollowerConfig{Address: address, TrustDomain: m.td,
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Roots:       func() []*x509.Certificate { return []*x509.Certificate{m.root.Root} },
		Imports:     tf.sink, PeerBundles: tf.bundles, Exports: tf.exports, StaleWindow: stale, RetryInterval: 50 * time.Millisecond, Metrics: tf.reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tf.stop = cancel
	go func() { tf.done <- tf.f.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-tf.done; err != nil {
			t.Errorf("follower Run: %v", err)
		}
	})
	return tf
}

// TestFollowerGetsTheMeshsImports: another primary of mesh-b, following mesh-b's
// federation endpoint, gets mesh-b's imports and peer bundles as the endpoint's own
// primary does, follows an unexport and a re-export, keeps the imports for the stale
// window when the endpoint dies, then withdraws them, and gets them back when the
// endpoint returns.
func TestFollowerGetsTheMeshsImports(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	// b's own stale window is long: what the follower withdraws is its own decision.
	b := newTestMeshStale(t, "mesh-b", "b.example", time.Minute)
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")

	const stale = 700 * time.Millisecond
	fl := newTestFollower(t, b, b.addr, nil, stale)
	want := func(what string, hosts ...string) time.Duration {
		t.Helper()
		start := time.Now()
		eventually(t, 10*time.Second, what, func() error {
			if got := fl.sink.hosts("mesh-a"); !slices.Equal(got, hosts) {
				return fmt.Errorf("follower has %v, want %v", got, hosts)
			}
			return nil
		})
		return time.Since(start)
	}
	want("follower imports echo", "echo.demo.svc.mesh-a.isthmus")
	fl.sink.mu.Lock()
	got := fl.sink.got["mesh-a"][0]
	fl.sink.mu.Unlock()
	if got.TrustDomain != "a.example" || got.Key != (mesh.ServiceKey{Namespace: "demo", Name: "echo"}) || len(got.Gateways) != 1 || got.Gateways[0].String() != "10.9.0.1:15443" {
		t.Errorf("follower's import %+v", got)
	}
	eventually(t, 5*time.Second, "follower has a.example's bundle", func() error {
		if d := fl.bundles.domains(); !slices.Equal(d, []mesh.TrustDomain{"a.example"}) {
			return fmt.Errorf("bundles of %v", d)
		}
		return nil
	})
	if st := fl.f.Status(); !st.Connected || st.Imported["mesh-a"] != 1 {
		t.Errorf("status %+v", st)
	}
	// The endpoint's export set (cmd hands it the gateways' set) reaches the follower.
	set := ExportSet{Mesh: "mesh-b", Services: []ExportSetService{{Namespace: "demo", Name: "local", Ports: []uint16{8080}, Consumers: []mesh.MeshID{"mesh-a"}}},
		Peers: map[mesh.MeshID]mesh.TrustDomain{"mesh-a": "a.example"}}
	b.feed.SetExportSet(set)
	eventually(t, 5*time.Second, "follower has the export set", func() error {
		if got := fl.exports.get(); got.Mesh != "mesh-b" || len(got.Services) != 1 || got.Peers["mesh-a"] != "a.example" {
			return fmt.Errorf("export set %+v", got)
		}
		return nil
	})

	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}, "demo/other": {"mesh-b"}})
	t.Logf("a second export reached the follower in %s", want("follower imports both", "echo.demo.svc.mesh-a.isthmus", "other.demo.svc.mesh-a.isthmus"))
	a.export(nil)
	t.Logf("unexport reached the follower in %s", want("follower withdrew the imports"))
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	want("follower imports echo again", "echo.demo.svc.mesh-a.isthmus")

	// The endpoint dies: kept for the stale window, then withdrawn.
	killed := time.Now()
	b.kill()
	eventually(t, 5*time.Second, "follower sees the stream down", func() error {
		if fl.f.Status().Connected {
			return errors.New("still connected")
		}
		return nil
	})
	if got := fl.sink.hosts("mesh-a"); len(got) != 1 && time.Since(killed) < stale {
		t.Errorf("imports gone %s after the kill, before the stale window: %v", time.Since(killed), got)
	}
	want("imports withdrawn after the stale window")
	if got := fl.exports.get(); len(got.Services) != 0 || len(got.Peers) != 0 {
		t.Errorf("export set %+v kept after the stale window", got)
	}
	if d := time.Since(killed); d < stale {
		t.Errorf("withdrawn %s after the kill, before the %s stale window", d, stale)
	}
	if !fl.f.Status().Withdrawn || testutil.ToFloat64(fl.f.up) != 0 {
		t.Errorf("status %+v", fl.f.Status())
	}
	b.start()
	want("imports back with the endpoint", "echo.demo.svc.mesh-a.isthmus")
}

// TestFollowRefusals: the feed is served only to the mesh's own federation identity
// chaining to the mesh's roots, and a follower accepts only such an endpoint.
func TestFollowRefusals(t *testing.T) {
	a := newTestMesh(t, "mesh-a", "a.example")
	b := newTestMesh(t, "mesh-b", "b.example")
	a.export(map[string][]mesh.MeshID{"demo/echo": {"mesh-b"}})
	peerMeshes(t, a, b, "mesh-b")
	b.waitImports("mesh-a", "echo.demo.svc.mesh-a.isthmus")

	workload := func() *tls.Certificate { // a workload of mesh-b: right root, wrong SPIFFE ID
		t.Helper()
		ca, err := b.root.NewIntermediate(trust.IntermediateOptions{Cluster: "mesh-b-c3"})
		if err != nil {
			t.Fatal(err)
		}
		id, _ := mesh.NewIdentity("b.example", "demo", "echo")
		c, err := issueCertificate(context.Background(), ca, id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	refused := func(reason string) float64 {
		return testutil.ToFloat64(b.ep.metrics.streamRefused.WithLabelValues("follow", reason))
	}
	for _, c := range []struct {
		name, reason, msg string
		cert              *tls.Certificate
	}{
		{"no certificate", ReasonCertificate, "no client certificate", nil},
		{"the peer mesh's federation identity", ReasonTrustDomain, "certificate of trust domain a.example, not this mesh's b.example", a.cert},
		{"b.example's federation identity from another root", ReasonBundle, "", endpointCert(t, "b.example")},
		{"a workload of mesh-b", ReasonIdentity, "spiffe://b.example/ns/demo/sa/echo is not the mesh's federation identity", workload()},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := followAs(t, b, c.cert)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("got %v, want PermissionDenied saying %q", err, c.msg)
			}
			counter(t, refused(c.reason), 1, "stream_refused{follow,"+c.reason+"}")
		})
	}
	if err := followAs(t, b, b.cert); err == nil || !strings.Contains(err.Error(), "got a frame") {
		t.Fatalf("the mesh's own identity: %v", err)
	}

	// mesh-b's follower pointed at mesh-a's endpoint refuses it (another trust domain).
	fl := newTestFollower(t, b, a.addr, nil, time.Minute)
	eventually(t, 10*time.Second, "follower refuses a peer's endpoint", func() error {
		if v := testutil.ToFloat64(fl.f.refused.WithLabelValues(ReasonTrustDomain)); v < 1 {
			return fmt.Errorf("follow_refused{trust_domain} = %v; %+v", v, fl.f.Status())
		}
		return nil
	})
}

// followAs opens the mesh feed of m presenting cert and returns why no frame came.
func followAs(t *testing.T, m *testMesh, cert *tls.Certificate) error {
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
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, methodFollow)
	if err != nil {
		return err
	}
	if err := stream.SendMsg(&followRequest{}); err != nil {
		return err
	}
	_ = stream.CloseSend()
	var f rawFrame
	if err := stream.RecvMsg(&f); err != nil {
		return err
	}
	return fmt.Errorf("got a frame: %s", f.b)
}

func TestDecodeFeedFrame(t *testing.T) {
	good := `{"peers":[{"mesh":"mesh-a","trustDomain":"a.example","services":[{"namespace":"demo","name":"echo","ports":[{"name":"grpc","port":8080}],"gateways":["10.0.0.1:15443"],"consumers":[]}]}]}`
	if _, err := DecodeFeedFrame([]byte(good)); err != nil {
		t.Fatalf("good frame refused: %v", err)
	}
	for _, c := range []struct{ name, from, to, want string }{
		{"unknown field", `"peers"`, `"x":1,"peers"`, "unknown field"},
		{"bad mesh", `"mesh-a"`, `"Mesh A"`, "mesh"},
		{"bad gateway", `10.0.0.1:15443`, `0.0.0.0:15443`, "gateway"},
		{"no ports", `[{"name":"grpc","port":8080}]`, `[]`, "0 ports"},
		{"trailing data", `}]}]}`, `}]}]}{}`, "data after"},
		{"bad bundle", `}]}]}`, `}]}],"bundles":{"a.example":"nope"}}`, "bundle of a.example"},
		{"export to a mesh that is not a peer", `}]}]}`, `}]}],"exports":{"mesh":"mesh-b","services":[{"namespace":"demo","name":"x","ports":[80],"consumers":["mesh-c"]}],"peers":{"mesh-a":"a.example"}}}`, "consumer mesh-c is not a live peer"},
		{"exports without a mesh", `}]}]}`, `}]}],"exports":{"services":[{"namespace":"demo","name":"x","ports":[80],"consumers":["mesh-a"]}],"peers":{"mesh-a":"a.example"}}}`, "without the mesh's ID"},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := strings.Replace(good, c.from, c.to, 1)
			if src == good {
				t.Fatal("case changes nothing")
			}
			if _, err := DecodeFeedFrame([]byte(src)); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want an error saying %q", err, c.want)
			}
		})
	}
}

// FuzzFeedFrame: whatever a follower receives, decoding never panics, and a frame it
// accepts encodes and decodes again to an accepted frame with the same peers and exports.
func FuzzFeedFrame(f *testing.F) {
	f.Add([]byte(`{"peers":[{"mesh":"mesh-a","trustDomain":"a.example","services":[{"namespace":"demo","name":"echo","ports":[{"name":"grpc","port":8080}],"gateways":["10.0.0.1:15443"],"consumers":[]}]}],"exports":{"mesh":"mesh-b","services":[{"namespace":"demo","name":"x","ports":[80],"consumers":["mesh-a"]}],"peers":{"mesh-a":"a.example"}}}`))
	f.Add([]byte(`{"peers":[]}`))
	f.Add([]byte(`{"peers":[{"mesh":"m","trustDomain":"t","services":null}],"bundles":{"t":""}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := DecodeFeedFrame(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(fr)
		if err != nil {
			t.Fatal(err)
		}
		fr2, err := DecodeFeedFrame(again)
		if err != nil {
			t.Fatalf("an accepted frame, encoded again, is refused: %v\n%s", err, again)
		}
		if len(fr2.Peers) != len(fr.Peers) || len(fr2.Exports.Services) != len(fr.Exports.Services) {
			t.Fatalf("round trip changed the frame: %+v vs %+v", fr, fr2)
		}
	})
}
