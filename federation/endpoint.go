package federation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// EndpointConfig configures NewEndpoint.
type EndpointConfig struct {
	// Mesh and TrustDomain are this mesh's. Required.
	Mesh        mesh.MeshID
	TrustDomain mesh.TrustDomain
	// Certificate returns the endpoint's certificate (IssueEndpointCertificate), presented
	// as server and as client. Required.
	Certificate func() (*tls.Certificate, error)
	// Roots returns this mesh's trust-bundle roots, given to peers at peering. Required.
	Roots func() []*x509.Certificate
	// Listener is where the federation endpoint serves (TLS is applied here). Required.
	Listener net.Listener
	// Advertise are the addresses put in tokens and given to peers; default the
	// listener's address.
	Advertise []string
	// GossipBindAddr and GossipPort are where the memberlist pool listens; default
	// 127.0.0.1 and a free port.
	GossipBindAddr string
	GossipPort     int
	// Gateways are this mesh's east-west gateways (IP:port) put in every catalog entry.
	Gateways []string
	// Exports is what this mesh exports; nil exports nothing.
	Exports ExportSource
	// Imports receives what peers export to this mesh; nil drops it (counted only).
	Imports ImportSink
	// PeerBundles receives the live peers' trust bundles; nil keeps them to the
	// federation endpoint.
	PeerBundles PeerBundleSink
	// Feed, when set, is served to the mesh's other primaries (Follow); cmd hands it the
	// same imports and bundles as Imports and PeerBundles.
	Feed *MeshFeed
	// Problems, when set, lists why exports or imports are not served (PeeringList).
	Problems func() []string
	// Store persists peerings; default a MemoryStore.
	Store Store
	// StaleWindow is how long a FAILING peer's imports are kept before they are
	// withdrawn (the link-health policy): default one minute; negative withdraws at once.
	StaleWindow time.Duration
	// TokenTTL is how long a token may be used; default one hour.
	TokenTTL time.Duration
	// RetryInterval is the pause between attempts to open a peer's catalog stream;
	// default 500 ms.
	RetryInterval time.Duration
	// Log defaults to discarding; Metrics nil registers nothing.
	Log     *slog.Logger
	Metrics prometheus.Registerer
	// Now defaults to time.Now (tests move the clock for expiry).
	Now func() time.Time
}

// Endpoint is a mesh's federation endpoint: it makes and accepts peering tokens, serves
// its catalogs to peers, imports theirs, and keeps the gossip pool. Run serves it.
type Endpoint struct {
	cfg     EndpointConfig
	log     *slog.Logger
	srv     *grpc.Server
	metrics endpointMetrics
	wake    chan struct{}
	seqBase uint64 // start of catalog sequences: a restarted exporter never goes back

	// exportsMu guards exportsGen and exportsCh: exportsCh is closed and replaced on
	// every change of the exports, so each catalog stream waits on it without consuming
	// a shared signal.
	exportsMu  sync.Mutex
	exportsGen uint64
	exportsCh  chan struct{}

	// aliveMu guards alive: the pool's view (mesh ID → alive), fed by the pool's
	// callback, which must never wait for mu (memberlist calls it holding its locks).
	aliveMu sync.Mutex
	alive   map[mesh.MeshID]bool

	mu sync.Mutex
	// state is the persisted state; rt the running side of each peering by name; pool
	// the gossip pool (nil before the first token or peering). All guarded by mu.
	state *StoredState
	rt    map[string]*peerRuntime
	pool  *Pool
	// bundles is the set last given to PeerBundles; guarded by mu.
	bundles map[mesh.TrustDomain]string
	// poolTried is when reconcile last tried to start a pool that was not running
	// (its port taken, say); guarded by mu.
	poolTried time.Time
}

// peerRuntime is what runs for one peering; guarded by Endpoint.mu.
type peerRuntime struct {
	cancel       context.CancelFunc // stops the watch client
	done         chan struct{}      // closed when the peering is deleted: ends its server streams
	streamUp     bool
	streamErr    error
	everUp       bool
	failingSince time.Time
	withdrawn    bool
	revoked      bool // the peer refused us (PermissionDenied): withdraw at once
	lastJoin     time.Time
	held         []ImportedService // the last accepted catalog's imports, applied unless withdrawn
}

type endpointMetrics struct {
	catalogRefused   *prometheus.CounterVec
	streamRefused    *prometheus.CounterVec
	tokenRefused     *prometheus.CounterVec
	establishRefused *prometheus.CounterVec
	imported         *prometheus.GaugeVec
}

// NewEndpoint validates cfg and loads the stored peerings; Run serves.
func NewEndpoint(cfg EndpointConfig) (*Endpoint, error) {
	if _, err := mesh.ParseMeshID(string(cfg.Mesh)); err != nil {
		return nil, fmt.Errorf("federation: endpoint: %w", err)
	}
	if _, err := mesh.ParseTrustDomain(string(cfg.TrustDomain)); err != nil {
		return nil, fmt.Errorf("federation: endpoint: %w", err)
	}
	if cfg.Certificate == nil || cfg.Roots == nil || cfg.Listener == nil {
		return nil, errors.New("federation: endpoint: Certificate, Roots and Listener are required")
	}
	for _, g := range cfg.Gateways {
		if err := (&ExportedService{Ports: []CatalogPort{{Port: 1}}, Gateways: []string{g}, Consumers: []mesh.MeshID{"x"}}).validate(); err != nil {
			return nil, fmt.Errorf("federation: endpoint: %w", err)
		}
	}
	if len(cfg.Advertise) == 0 {
		cfg.Advertise = []string{cfg.Listener.Addr().String()}
	}
	if cfg.GossipBindAddr == "" {
		cfg.GossipBindAddr = "127.0.0.1"
	}
	if cfg.Store == nil {
		cfg.Store = &MemoryStore{}
	}
	if cfg.StaleWindow == 0 {
		cfg.StaleWindow = time.Minute
	}
	if cfg.TokenTTL == 0 {
		cfg.TokenTTL = time.Hour
	}
	if cfg.RetryInterval == 0 {
		cfg.RetryInterval = 500 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	st, err := cfg.Store.Load()
	if err != nil {
		return nil, err
	}
	e := &Endpoint{cfg: cfg, log: cfg.Log.With("component", "federation", "mesh", cfg.Mesh), wake: make(chan struct{}, 1),
		seqBase: uint64(time.Now().UnixNano()), exportsCh: make(chan struct{}), alive: map[mesh.MeshID]bool{},
		state: st, rt: map[string]*peerRuntime{},
		metrics: endpointMetrics{
			catalogRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_catalog_refused_total",
				Help: "Catalogs received from peers and refused, by reason (mesh, trust_domain, not_exported, invalid, stale)."}, []string{"peer", "reason"}),
			streamRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_stream_refused_total",
				Help: "Catalog streams refused, by side (server: a peer's Watch; client: the endpoint at a peer's address) and reason (certificate, trust_domain, mesh, bundle)."}, []string{"side", "reason"}),
			tokenRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_token_refused_total",
				Help: "Tokens refused by this mesh as the dialer, by reason (malformed, expired, self, conflict, bundle, identity, federation, peer)."}, []string{"reason"}),
			establishRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_establish_refused_total",
				Help: "Establish requests refused, by reason (unknown, used, expired, revoked, secret, identity, bundle, conflict)."}, []string{"reason"}),
			imported: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "isthmus_federation_imported_services",
				Help: "Services imported from each peer mesh now."}, []string{"peer"}),
		}}
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{e.metrics.catalogRefused, e.metrics.streamRefused, e.metrics.tokenRefused, e.metrics.establishRefused, e.metrics.imported} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("federation: metrics: %w", err)
			}
		}
	}
	tlsConf := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		ClientAuth:     tls.RequestClientCert, // Bundle and Establish need none; Watch verifies it per peering
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return cfg.Certificate() },
	}
	e.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConf)), grpc.ForceServerCodec(jsonCodec{}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Second}), // peers ping every 2 s
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * time.Second, Timeout: 2 * time.Second}))
	e.srv.RegisterService(&serviceDesc, e)
	return e, nil
}

// Run serves the endpoint until ctx ends: the gRPC service, the gossip pool, a catalog
// stream from every established peer, and the link-health policy.
func (e *Endpoint) Run(ctx context.Context) error {
	e.mu.Lock()
	if e.state.FederationID != "" && e.pool == nil { // CreateToken or Establish may have started it
		if err := e.startPoolLocked(); err != nil {
			e.mu.Unlock()
			return err
		}
	}
	e.mu.Unlock()
	serveErr := make(chan error, 1)
	go func() { serveErr <- e.srv.Serve(e.cfg.Listener) }()
	var exportsDone chan struct{}
	if e.cfg.Exports != nil {
		exportsDone = make(chan struct{})
		go func() {
			defer close(exportsDone)
			for {
				select {
				case <-ctx.Done():
					return
				case <-e.cfg.Exports.Changed():
					e.bumpExports()
				}
			}
		}()
	}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	e.kick()
	var err error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err = <-serveErr:
			err = fmt.Errorf("federation: serve: %w", err)
			break loop
		case <-e.wake:
			e.reconcile(ctx)
		case <-tick.C:
			e.reconcile(ctx)
		}
	}
	e.mu.Lock()
	for _, rt := range e.rt {
		rt.cancel()
	}
	pool := e.pool
	e.pool = nil
	e.mu.Unlock()
	e.srv.Stop()
	if pool != nil {
		pool.Close()
	}
	if exportsDone != nil {
		<-exportsDone
	}
	return err
}

// gossipAddr is the pool's address, or the configured one before the pool runs.
func (e *Endpoint) gossipAddr() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.pool != nil {
		return e.pool.Addr()
	}
	if e.cfg.GossipPort != 0 {
		return net.JoinHostPort(e.cfg.GossipBindAddr, strconv.Itoa(e.cfg.GossipPort))
	}
	return ""
}

// kick asks Run's loop to reconcile soon.
func (e *Endpoint) kick() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

func (e *Endpoint) bumpExports() {
	e.exportsMu.Lock()
	e.exportsGen++
	close(e.exportsCh)
	e.exportsCh = make(chan struct{})
	e.exportsMu.Unlock()
}

func (e *Endpoint) exportsNow() (uint64, <-chan struct{}) {
	e.exportsMu.Lock()
	defer e.exportsMu.Unlock()
	return e.exportsGen, e.exportsCh
}

// startPoolLocked starts the gossip pool for the stored federation.
func (e *Endpoint) startPoolLocked() error {
	p, err := NewPool(PoolConfig{Name: string(e.cfg.Mesh), BindAddr: e.cfg.GossipBindAddr, BindPort: e.cfg.GossipPort,
		FederationID: e.state.FederationID, Secret: e.state.FederationSecret,
		Meta:     MemberMeta{TrustDomain: string(e.cfg.TrustDomain), Endpoint: e.cfg.Advertise[0]},
		OnChange: e.onMember, Log: e.cfg.Log, Metrics: e.cfg.Metrics})
	if err != nil {
		return err
	}
	e.pool = p
	// Rejoin the known peers' pools (after a restart); failures are retried by reconcile.
	var addrs []string
	for _, pe := range e.state.Peerings {
		if pe.State != StateTerminated && pe.State != StatePending {
			addrs = append(addrs, pe.PeerGossip...)
		}
	}
	if len(addrs) > 0 {
		go func() { _ = p.Join(addrs) }()
	}
	return nil
}

// onMember is the pool's callback: it records liveness and wakes the loop, never taking
// mu (memberlist calls it with its own locks held).
func (e *Endpoint) onMember(m Member) {
	e.aliveMu.Lock()
	e.alive[mesh.MeshID(m.Name)] = m.Alive
	e.aliveMu.Unlock()
	e.kick()
}

func (e *Endpoint) isAlive(m mesh.MeshID) bool {
	e.aliveMu.Lock()
	defer e.aliveMu.Unlock()
	return e.alive[m]
}

// saveLocked persists the state; on error the caller must undo its change.
func (e *Endpoint) saveLocked() error { return e.cfg.Store.Save(e.state) }

// findLocked returns the index of the live (non-terminated) peering called name, or -1.
func (e *Endpoint) findLocked(name string) int {
	return slices.IndexFunc(e.state.Peerings, func(p Peering) bool { return p.Name == name && p.State != StateTerminated })
}

// reconcile starts the catalog stream of every established peering, stops those of
// deleted ones, applies the state rules and the stale window, and expires tokens.
func (e *Endpoint) reconcile(ctx context.Context) {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.cfg.Now()
	changed := false
	// A mesh in a federation whose pool did not start (Establish or CreateToken failed
	// to bind it) tries again, at most once a second.
	if e.pool == nil && e.state.FederationID != "" && time.Since(e.poolTried) >= time.Second {
		e.poolTried = time.Now()
		if err := e.startPoolLocked(); err != nil {
			e.log.Warn("gossip pool did not start; retrying", "err", err)
		}
	}
	for i := range e.state.Peerings {
		p := &e.state.Peerings[i]
		rt := e.rt[p.Name+"/"+p.ID]
		switch p.State {
		case StateTerminated:
			continue
		case StatePending:
			if now.After(p.ExpiresAt) {
				p.State, p.Reason, p.SecretHash = StateTerminated, "token expired unused", ""
				changed = true
			}
			continue
		}
		if rt == nil {
			rt = &peerRuntime{done: make(chan struct{})}
			wctx, cancel := context.WithCancel(ctx)
			rt.cancel = cancel
			e.rt[p.Name+"/"+p.ID] = rt
			go e.watchPeer(wctx, p.Name, p.ID)
		}
		next, reason := p.State, ""
		alive := e.isAlive(p.PeerMesh)
		// A peer whose stream is up but who is not in our pool restarted or was never
		// joined from this side: join it, at most once a second.
		if rt.streamUp && !alive && e.pool != nil && len(p.PeerGossip) > 0 && now.Sub(rt.lastJoin) > time.Second {
			rt.lastJoin = now
			pool, addrs := e.pool, slices.Clone(p.PeerGossip)
			go func() { _ = pool.Join(addrs) }()
		}
		switch {
		case rt.streamUp && alive:
			next = StateActive
		case !rt.everUp && p.State == StateEstablishing:
			// still establishing: nothing has failed yet
		case !rt.streamUp:
			next, reason = StateFailing, fmt.Sprintf("catalog stream down: %v", rt.streamErr)
		default:
			next, reason = StateFailing, "peer not alive in the gossip pool"
		}
		if next != p.State {
			if s, err := p.State.Move(next); err == nil {
				e.log.Info("peering state", "peer", p.Name, "from", p.State, "to", s, "reason", reason)
				p.State = s
				changed = true
			}
		}
		if p.State == StateFailing {
			if p.Reason != reason && !rt.withdrawn {
				p.Reason = reason
			}
			if rt.failingSince.IsZero() {
				rt.failingSince = now
			}
			if !rt.withdrawn && p.Imported > 0 && (rt.revoked || e.cfg.StaleWindow < 0 || now.Sub(rt.failingSince) >= e.cfg.StaleWindow) {
				rt.withdrawn = true
				e.replaceImportsLocked(p, nil)
				p.Reason = reason + fmt.Sprintf("; imports withdrawn after %s (stale window)", now.Sub(rt.failingSince).Round(time.Millisecond))
				e.log.Warn("withdrawing imports of failing peer", "peer", p.Name, "failing_for", now.Sub(rt.failingSince))
			}
		} else if p.State == StateActive {
			p.SecretHash = "" // the dialer streams: no Establish replay is needed any more
			if rt.withdrawn {
				e.log.Info("restoring imports of recovered peer", "peer", p.Name, "services", len(rt.held))
				e.replaceImportsLocked(p, rt.held)
			}
			rt.failingSince, rt.withdrawn, rt.revoked = time.Time{}, false, false
			if p.ImportError == "" {
				p.Reason = ""
			}
		}
	}
	// The live peers' bundles, to the sink when they changed.
	if e.cfg.PeerBundles != nil {
		want := map[mesh.TrustDomain]string{}
		for _, p := range e.state.Peerings {
			if p.State != StateTerminated && p.State != StatePending && p.PeerRootsPEM != "" {
				want[p.PeerTrustDomain] = p.PeerRootsPEM
			}
		}
		if e.bundles == nil || !maps.Equal(want, e.bundles) {
			e.bundles = want
			e.cfg.PeerBundles.SetPeerBundles(maps.Clone(want))
		}
	}
	// Stop what runs for peerings that are gone.
	for key, rt := range e.rt {
		if !slices.ContainsFunc(e.state.Peerings, func(p Peering) bool { return p.Name+"/"+p.ID == key && p.State != StateTerminated }) {
			rt.cancel()
			close(rt.done)
			delete(e.rt, key)
		}
	}
	if changed {
		if err := e.saveLocked(); err != nil {
			e.log.Error("save federation state", "err", err)
		}
	}
}

// replaceImportsLocked sets the imports of peering p.
func (e *Endpoint) replaceImportsLocked(p *Peering, services []ImportedService) {
	p.Imported = len(services)
	e.metrics.imported.WithLabelValues(string(p.PeerMesh)).Set(float64(len(services)))
	if e.cfg.Imports != nil {
		e.cfg.Imports.ReplaceImports(p.PeerMesh, services)
	}
}

// Peerings returns every peering, terminated ones included, sorted by name, the live one
// before terminated ones, newest first.
func (e *Endpoint) Peerings() []Peering {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := slices.Clone(e.state.Peerings)
	for i := range out {
		out[i].SecretHash, out[i].PeerRootsPEM = "", "" // secrets stay inside; bundles are long
	}
	slices.SortStableFunc(out, func(a, b Peering) int {
		if a.Name != b.Name {
			return compareStrings(a.Name, b.Name)
		}
		if (a.State == StateTerminated) != (b.State == StateTerminated) {
			if a.State == StateTerminated {
				return 1 // live before terminated
			}
			return -1
		}
		return b.CreatedAt.Compare(a.CreatedAt) // newest first
	})
	return out
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// Peering returns the live peering called name, or the last terminated one.
func (e *Endpoint) Peering(name string) (Peering, bool) {
	var found *Peering
	for _, p := range e.Peerings() {
		if p.Name == name && (found == nil || found.State == StateTerminated) {
			found = &p
		}
	}
	if found == nil {
		return Peering{}, false
	}
	return *found, true
}

// Members returns the gossip pool's members as this endpoint sees them (nil before the
// first peering).
func (e *Endpoint) Members() []Member {
	e.mu.Lock()
	p := e.pool
	e.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Members()
}

// Delete terminates the live peering called name: its imports are withdrawn at once, its
// streams end, its peer's bundle is forgotten, so the peer's later calls are refused.
func (e *Endpoint) Delete(name string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	i := e.findLocked(name)
	if i < 0 {
		return fmt.Errorf("federation: no peering %q", name)
	}
	p := &e.state.Peerings[i]
	old := *p
	p.State, p.Reason, p.PeerRootsPEM, p.SecretHash, p.Imported = StateTerminated, "deleted", "", "", 0
	if err := e.saveLocked(); err != nil {
		*p = old
		return err
	}
	if old.Imported > 0 {
		e.replaceImportsLocked(p, nil)
	}
	e.kick()
	return nil
}
