package federation

import (
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// The mesh feed (docs/federation.md, "Imports reach every primary of the mesh"): the
// federation endpoint streams the mesh's imports and the peers' bundles to the mesh's
// other primaries, which follow it.

const methodFollow = "/" + serviceName + "/Follow"

// Reasons a follow stream or frame is refused (the reason labels of
// isthmus_federation_stream_refused_total{side="follow"} and
// isthmus_federation_follow_refused_total).
const (
	ReasonCertificate = "certificate"
	ReasonIdentity    = "identity"
	ReasonBundle      = "bundle"
)

// FeedPeer is what the mesh imports from one peer, as a frame of the mesh feed carries it.
type FeedPeer struct {
	Mesh        mesh.MeshID       `json:"mesh"`
	TrustDomain mesh.TrustDomain  `json:"trustDomain"`
	Services    []ExportedService `json:"services"`
}

// FeedFrame is one frame of the mesh feed: every peer's imports (sorted by mesh), the
// peers' bundles (empty unless the endpoint shares them) and what the mesh exports, as
// the primaries' gateways and servers need it; complete.
type FeedFrame struct {
	Peers   []FeedPeer                  `json:"peers"`
	Bundles map[mesh.TrustDomain]string `json:"bundles,omitempty"`
	Exports ExportSet                   `json:"exports"`
}

// ExportSet is what the mesh exports, as every primary of it serves it: each exported
// service with its exported ports and the live peers it is exported to, and every live
// peer's trust domain (whose callers servers refuse on services not exported to it).
type ExportSet struct {
	// Mesh is the exporting mesh's ID (the name peers give its services); empty in the
	// zero set.
	Mesh     mesh.MeshID                      `json:"mesh,omitempty"`
	Services []ExportSetService               `json:"services"`
	Peers    map[mesh.MeshID]mesh.TrustDomain `json:"peers,omitempty"`
}

// ExportSetService is one service of an ExportSet.
type ExportSetService struct {
	Namespace string        `json:"namespace"`
	Name      string        `json:"name"`
	Ports     []uint16      `json:"ports"`
	Consumers []mesh.MeshID `json:"consumers"`
}

// ExportSetSink receives the mesh's export set, complete, on every change; it must not
// block.
type ExportSetSink interface {
	SetExportSet(ExportSet)
}

// validate checks names, ports, consumers and peers.
func (x ExportSet) validate() error {
	if len(x.Services) > maxCatalogServices {
		return fmt.Errorf("%d exported services, more than %d", len(x.Services), maxCatalogServices)
	}
	if x.Mesh != "" {
		if _, err := mesh.ParseMeshID(string(x.Mesh)); err != nil {
			return fmt.Errorf("exports: %w", err)
		}
	} else if len(x.Services) > 0 {
		return errors.New("exports without the mesh's ID")
	}
	seen := map[mesh.ServiceKey]bool{}
	for _, s := range x.Services {
		key, err := mesh.NewServiceKey(s.Namespace, s.Name)
		if err != nil {
			return fmt.Errorf("export: %w", err)
		}
		if seen[key] {
			return fmt.Errorf("export %s twice", key)
		}
		seen[key] = true
		if len(s.Ports) == 0 || len(s.Ports) > maxServicePorts || slices.Contains(s.Ports, 0) {
			return fmt.Errorf("export %s: ports %v", key, s.Ports)
		}
		if len(s.Consumers) == 0 {
			return fmt.Errorf("export %s: no consumers", key)
		}
		for _, m := range s.Consumers {
			if _, ok := x.Peers[m]; !ok {
				return fmt.Errorf("export %s: consumer %s is not a live peer", key, m)
			}
		}
	}
	for m, td := range x.Peers {
		if _, err := mesh.ParseMeshID(string(m)); err != nil {
			return fmt.Errorf("export peers: %w", err)
		}
		if _, err := mesh.ParseTrustDomain(string(td)); err != nil {
			return fmt.Errorf("export peer %s: %w", m, err)
		}
	}
	return nil
}

type followRequest struct{}

// MeshFeed is an ImportSink and PeerBundleSink that keeps the mesh's current imports and
// peer bundles for the followers (EndpointConfig.Feed). Its methods never block.
type MeshFeed struct {
	mu sync.Mutex
	// imports by peer, bundles, and changed (closed and replaced on every change, so
	// that each follow stream waits on it without consuming a shared signal); guarded
	// by mu.
	imports map[mesh.MeshID][]ImportedService
	bundles map[mesh.TrustDomain]string
	exports ExportSet
	changed chan struct{}
}

// NewMeshFeed returns an empty feed.
func NewMeshFeed() *MeshFeed {
	return &MeshFeed{imports: map[mesh.MeshID][]ImportedService{}, changed: make(chan struct{})}
}

// ReplaceImports implements ImportSink.
func (f *MeshFeed) ReplaceImports(peer mesh.MeshID, services []ImportedService) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(services) == 0 {
		delete(f.imports, peer)
	} else {
		f.imports[peer] = slices.Clone(services)
	}
	f.bumpLocked()
}

// SetPeerBundles implements PeerBundleSink.
func (f *MeshFeed) SetPeerBundles(b map[mesh.TrustDomain]string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.bundles = maps.Clone(b)
	f.bumpLocked()
}

// SetExportSet implements ExportSetSink.
func (f *MeshFeed) SetExportSet(x ExportSet) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.exports = ExportSet{Mesh: x.Mesh, Services: slices.Clone(x.Services), Peers: maps.Clone(x.Peers)}
	f.bumpLocked()
}

func (f *MeshFeed) bumpLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// frame returns the current frame and a channel closed at the next change.
func (f *MeshFeed) frame() (FeedFrame, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fr := FeedFrame{Peers: []FeedPeer{}, Bundles: maps.Clone(f.bundles),
		Exports: ExportSet{Mesh: f.exports.Mesh, Services: slices.Clone(f.exports.Services), Peers: maps.Clone(f.exports.Peers)}}
	if fr.Exports.Services == nil {
		fr.Exports.Services = []ExportSetService{}
	}
	for peer, svcs := range f.imports {
		fp := FeedPeer{Mesh: peer, Services: []ExportedService{}}
		for _, s := range svcs {
			fp.TrustDomain = s.TrustDomain
			es := ExportedService{Namespace: s.Key.Namespace, Name: s.Key.Name, Ports: slices.Clone(s.Ports), Consumers: []mesh.MeshID{},
				Identities: identityStrings(s.Identities)}
			for _, g := range s.Gateways {
				es.Gateways = append(es.Gateways, g.String())
			}
			fp.Services = append(fp.Services, es)
		}
		slices.SortFunc(fp.Services, func(a, b ExportedService) int {
			return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
		})
		fr.Peers = append(fr.Peers, fp)
	}
	slices.SortFunc(fr.Peers, func(a, b FeedPeer) int { return cmp.Compare(a.Mesh, b.Mesh) })
	return fr, f.changed
}

// DecodeFeedFrame parses a frame strictly and checks it whole: each peer a valid mesh ID
// and trust domain, not twice, each service as a catalog entry is checked (names, ports,
// gateways, limits), each bundle PEM CA certificates of a valid trust domain. A frame that
// fails any check is refused whole.
func DecodeFeedFrame(b []byte) (*FeedFrame, error) {
	if len(b) > maxCatalogBytes {
		return nil, fmt.Errorf("federation: feed frame of %d bytes, more than %d", len(b), maxCatalogBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var fr FeedFrame
	if err := dec.Decode(&fr); err != nil {
		return nil, fmt.Errorf("federation: feed frame: decode: %w", err)
	}
	if dec.More() {
		return nil, errors.New("federation: feed frame: data after the frame")
	}
	seen := map[mesh.MeshID]bool{}
	for i, p := range fr.Peers {
		if seen[p.Mesh] {
			return nil, fmt.Errorf("federation: feed frame: peer %s twice", p.Mesh)
		}
		seen[p.Mesh] = true
		// The consumers field of a catalog entry means nothing here (every import is
		// this mesh's); the rest is checked as a catalog's.
		c := Catalog{Mesh: p.Mesh, TrustDomain: p.TrustDomain, Services: slices.Clone(p.Services)}
		for j := range c.Services {
			c.Services[j].Consumers = []mesh.MeshID{"self"}
		}
		if err := c.Validate(); err != nil {
			return nil, fmt.Errorf("federation: feed frame: peer %d (%s): %w", i, p.Mesh, err)
		}
		for _, svc := range p.Services {
			if id := foreignIdentity(svc.Identities, p.TrustDomain); id != "" {
				return nil, fmt.Errorf("federation: feed frame: peer %s: %s/%s lists identity %s outside trust domain %s", p.Mesh, svc.Namespace, svc.Name, id, p.TrustDomain)
			}
		}
	}
	if err := fr.Exports.validate(); err != nil {
		return nil, fmt.Errorf("federation: feed frame: %w", err)
	}
	for td, pem := range fr.Bundles {
		if _, err := mesh.ParseTrustDomain(string(td)); err != nil {
			return nil, fmt.Errorf("federation: feed frame: bundle: %w", err)
		}
		if _, err := parseRoots(pem); err != nil {
			return nil, fmt.Errorf("federation: feed frame: bundle of %s: %w", td, err)
		}
	}
	return &fr, nil
}

// follow serves one follower the mesh feed. The client must present exactly this
// endpoint's own SPIFFE ID (the federation identity every primary of the mesh issues
// itself), chaining to this mesh's roots: peers and workloads are refused.
func (e *Endpoint) follow(_ *followRequest, stream grpc.ServerStream) error {
	deny := func(code codes.Code, reason, format string, args ...any) error {
		e.metrics.streamRefused.WithLabelValues("follow", reason).Inc()
		msg := fmt.Sprintf(format, args...)
		e.log.Warn("follow stream refused", "reason", reason, "detail", msg)
		return status.Error(code, "federation: follow refused: "+msg)
	}
	if e.cfg.Feed == nil {
		return status.Error(codes.Unimplemented, "federation: this endpoint serves no mesh feed")
	}
	own, err := e.cfg.Certificate()
	if err != nil {
		return status.Errorf(codes.Unavailable, "federation: follow: own certificate: %v", err)
	}
	if err := checkMeshIdentity(peerCerts(stream.Context()), e.cfg.Roots(), e.cfg.TrustDomain, own); err != nil {
		var ie *identityError
		errors.As(err, &ie)
		return deny(codes.PermissionDenied, ie.reason, "%v", ie.err)
	}
	ctx := stream.Context()
	for {
		fr, changed := e.cfg.Feed.frame()
		b, err := json.Marshal(fr)
		if err != nil {
			return status.Errorf(codes.Internal, "federation: encode feed frame: %v", err)
		}
		if err := stream.SendMsg(&rawFrame{b: b}); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// identityError is a refused mesh identity with its metric reason.
type identityError struct {
	reason string
	err    error
}

func (e *identityError) Error() string { return e.err.Error() }

// checkMeshIdentity requires of a chain the SPIFFE ID of own's leaf, in td, chaining to
// roots. Errors are *identityError.
func checkMeshIdentity(raw [][]byte, roots []*x509.Certificate, td mesh.TrustDomain, own *tls.Certificate) error {
	if len(raw) == 0 {
		return &identityError{ReasonCertificate, errors.New("no client certificate")}
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return &identityError{ReasonCertificate, err}
	}
	got, err := svidDomain(leaf)
	if err != nil {
		return &identityError{ReasonCertificate, err}
	}
	if got != td {
		return &identityError{ReasonTrustDomain, fmt.Errorf("certificate of trust domain %s, not this mesh's %s", got, td)}
	}
	if own == nil || own.Leaf == nil || len(own.Leaf.URIs) != 1 {
		return &identityError{ReasonCertificate, errors.New("own certificate has no single SPIFFE ID")}
	}
	if want := own.Leaf.URIs[0].String(); leaf.URIs[0].String() != want {
		return &identityError{ReasonIdentity, fmt.Errorf("%s is not the mesh's federation identity %s", leaf.URIs[0], want)}
	}
	if err := verifySVID(raw, roots, td); err != nil {
		return &identityError{ReasonBundle, err}
	}
	return nil
}

// FollowerConfig configures NewFollower.
type FollowerConfig struct {
	// Address is the mesh's federation endpoint (its --federation-addr). Required.
	Address string
	// TrustDomain is this mesh's. Required.
	TrustDomain mesh.TrustDomain
	// Certificate returns this primary's federation identity (IssueEndpointCertificate
	// from its own CA), presented to the endpoint and required of it. Required.
	Certificate func() (*tls.Certificate, error)
	// Roots returns this mesh's roots, which the endpoint's certificate must chain to.
	// Required.
	Roots func() []*x509.Certificate
	// Imports receives the imports, PeerBundles the peers' bundles, Exports the export
	// set. Any may be nil.
	Imports     ImportSink
	PeerBundles PeerBundleSink
	Exports     ExportSetSink
	// StaleWindow is how long the imports are kept while the stream is down: default one
	// minute; negative withdraws them at once.
	StaleWindow time.Duration
	// RetryInterval is the pause between attempts to open the stream; default 500 ms.
	RetryInterval time.Duration
	// Log defaults to discarding; Metrics nil registers nothing.
	Log     *slog.Logger
	Metrics prometheus.Registerer
}

// FollowerStatus is what a follower shows of its stream.
type FollowerStatus struct {
	Connected bool      `json:"connected"`
	LastFrame time.Time `json:"lastFrame,omitzero"`
	Error     string    `json:"error,omitempty"`
	// Withdrawn is true once the stale window ran out with the stream down.
	Withdrawn bool `json:"withdrawn,omitempty"`
	// Imported is the number of imported services, by peer.
	Imported map[mesh.MeshID]int `json:"imported,omitempty"`
}

// Follower follows the mesh's federation endpoint: another primary of the mesh writes
// the imports and peer bundles it receives into its own registry, cluster and bundle
// store. Run follows until ctx ends.
type Follower struct {
	cfg     FollowerConfig
	log     *slog.Logger
	refused *prometheus.CounterVec
	up      prometheus.Gauge

	mu sync.Mutex
	// st, peers (the peers whose imports were last applied) and downSince (zero while
	// the stream is up or before the first attempt); guarded by mu.
	st        FollowerStatus
	peers     map[mesh.MeshID]bool
	downSince time.Time
}

// NewFollower validates cfg.
func NewFollower(cfg FollowerConfig) (*Follower, error) {
	if cfg.Address == "" || cfg.Certificate == nil || cfg.Roots == nil {
		return nil, errors.New("federation: follower: Address, Certificate and Roots are required")
	}
	if _, err := mesh.ParseTrustDomain(string(cfg.TrustDomain)); err != nil {
		return nil, fmt.Errorf("federation: follower: %w", err)
	}
	if cfg.StaleWindow == 0 {
		cfg.StaleWindow = time.Minute
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 500 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	f := &Follower{cfg: cfg, log: cfg.Log.With("component", "federation-follower", "endpoint", cfg.Address), peers: map[mesh.MeshID]bool{},
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_follow_refused_total",
			Help: "What a follower refused of its federation endpoint, by reason (identity, trust_domain, bundle, certificate: the endpoint's certificate; invalid: a frame)."}, []string{"reason"}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_federation_follow_connected",
			Help: "1 while the follower's stream from the mesh's federation endpoint is up."})}
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{f.refused, f.up} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("federation: follower metrics: %w", err)
			}
		}
	}
	return f, nil
}

// Status returns the stream's state.
func (f *Follower) Status() FollowerStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.st
	st.Imported = maps.Clone(f.st.Imported)
	return st
}

// Run follows the endpoint until ctx ends, reconnecting every RetryInterval and applying
// the link-health policy while the stream is down.
func (f *Follower) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		err := f.once(ctx)
		if ctx.Err() != nil {
			return nil
		}
		f.down(err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(f.cfg.RetryInterval):
		}
	}
	return nil
}

// once runs one stream until it breaks.
func (f *Follower) once(ctx context.Context) error {
	own, err := f.cfg.Certificate()
	if err != nil {
		return fmt.Errorf("own certificate: %w", err)
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, // verified below, by SPIFFE ID
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return f.cfg.Certificate() },
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if err := checkMeshIdentity(raw, f.cfg.Roots(), f.cfg.TrustDomain, own); err != nil {
				var ie *identityError
				errors.As(err, &ie)
				f.refused.WithLabelValues(ie.reason).Inc()
				f.log.Warn("federation endpoint refused", "reason", ie.reason, "err", err)
				return err
			}
			return nil
		}}
	conn, err := dial(f.cfg.Address, tlsConf)
	if err != nil {
		return err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := conn.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true}, methodFollow)
	if err != nil {
		return err
	}
	if err := stream.SendMsg(&followRequest{}); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	for {
		var raw rawFrame
		if err := stream.RecvMsg(&raw); err != nil {
			return err
		}
		fr, err := DecodeFeedFrame(raw.b)
		if err != nil {
			// Our own endpoint sent nonsense: keep what we have, say why, retry.
			f.refused.WithLabelValues(ReasonInvalid).Inc()
			return err
		}
		f.apply(fr)
	}
}

// apply replaces every import and the bundles with the frame's.
func (f *Follower) apply(fr *FeedFrame) {
	f.mu.Lock()
	defer f.mu.Unlock()
	next := map[mesh.MeshID]bool{}
	imported := map[mesh.MeshID]int{}
	for _, p := range fr.Peers {
		svcs := importsOf(&Catalog{Mesh: p.Mesh, TrustDomain: p.TrustDomain, Services: p.Services})
		if f.cfg.Imports != nil {
			f.cfg.Imports.ReplaceImports(p.Mesh, svcs)
		}
		next[p.Mesh], imported[p.Mesh] = true, len(svcs)
	}
	for peer := range f.peers {
		if !next[peer] && f.cfg.Imports != nil {
			f.cfg.Imports.ReplaceImports(peer, nil)
		}
	}
	if f.cfg.PeerBundles != nil {
		f.cfg.PeerBundles.SetPeerBundles(fr.Bundles)
	}
	if f.cfg.Exports != nil {
		f.cfg.Exports.SetExportSet(fr.Exports)
	}
	f.peers = next
	f.downSince = time.Time{}
	f.st = FollowerStatus{Connected: true, LastFrame: time.Now().UTC(), Imported: imported}
	f.up.Set(1)
}

// down records a broken stream and withdraws the imports and the export set once the
// stale window is over
// (at the first down after it; Run retries every RetryInterval, so within that).
func (f *Follower) down(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	if f.downSince.IsZero() {
		f.downSince = now
		f.log.Warn("stream from the federation endpoint down; imports kept for the stale window", "err", err, "stale_window", f.cfg.StaleWindow)
	}
	f.st.Connected, f.st.Error = false, fmt.Sprint(err)
	f.up.Set(0)
	if f.st.Withdrawn || now.Sub(f.downSince) < f.cfg.StaleWindow {
		return
	}
	for peer := range f.peers {
		if f.cfg.Imports != nil {
			f.cfg.Imports.ReplaceImports(peer, nil)
		}
	}
	if f.cfg.Exports != nil { // fail closed: this primary's gateways stop routing exports
		f.cfg.Exports.SetExportSet(ExportSet{})
	}
	f.log.Warn("imports and exports withdrawn: the stream from the federation endpoint is down longer than the stale window", "peers", len(f.peers))
	f.peers, f.st.Withdrawn, f.st.Imported = map[mesh.MeshID]bool{}, true, nil
}
