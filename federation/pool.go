package federation

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/prometheus/client_golang/prometheus"
)

// gossipKeyInfo is the HKDF info string of the pool key, versioned so a future key
// schedule never collides with this one.
const gossipKeyInfo = "isthmus federation gossip v1"

// GossipKey derives the pool's AES-256 key from the federation secret and ID.
func GossipKey(secret []byte, federationID string) ([]byte, error) {
	if len(secret) < 16 {
		return nil, fmt.Errorf("federation: gossip secret is %d bytes, want at least 16", len(secret))
	}
	k, err := hkdf.Key(sha256.New, secret, []byte(federationID), gossipKeyInfo, 32)
	if err != nil {
		return nil, fmt.Errorf("federation: derive gossip key: %w", err)
	}
	return k, nil
}

// PoolLabel is the memberlist label of a federation's pool: packets and streams of any
// other label are dropped, so two federations never merge.
func PoolLabel(federationID string) string { return "isthmus/" + federationID }

// MemberMeta is what a member publishes in its memberlist node metadata (JSON, well under
// memberlist's 512-byte limit).
type MemberMeta struct {
	// TrustDomain is the member mesh's trust domain.
	TrustDomain string `json:"td"`
	// Endpoint is its federation endpoint (host:port), where its catalog stream is served.
	Endpoint string `json:"ep"`
}

// Member is one mesh in the pool as this member sees it.
type Member struct {
	// Name is the member's mesh ID.
	Name string
	// Addr is its gossip address (host:port).
	Addr string
	// Meta is what it published.
	Meta MemberMeta
	// Alive is false once memberlist has declared it dead or it left.
	Alive bool
}

// PoolConfig configures NewPool.
type PoolConfig struct {
	// Name is this member's name: the mesh ID. Required.
	Name string
	// BindAddr and BindPort are where gossip listens (UDP and TCP); BindPort 0 picks a
	// free port (Addr tells which). BindAddr defaults to 127.0.0.1: gossip never listens
	// on every interface unless asked.
	BindAddr string
	BindPort int
	// FederationID names the federation; it is the pool's label and salts its key.
	FederationID string
	// Secret is the federation secret the pool key is derived from (GossipKey). Required:
	// a pool never gossips in the clear.
	Secret []byte
	// Meta is published to the other members.
	Meta MemberMeta
	// OnChange is called, from memberlist's goroutine, when a member joins, changes or is
	// declared dead; it must not block.
	OnChange func(Member)
	// Log receives memberlist's log lines at debug level (errors at warn). Default: discard.
	Log *slog.Logger
	// Metrics registers the pool's metrics; nil registers nothing.
	Metrics prometheus.Registerer

	// profile replaces the tuned memberlist timings (tunedConfig) with another profile;
	// only the benchmarks set it, to compare with memberlist's LAN and WAN profiles.
	profile func() *memberlist.Config
}

// Pool is a memberlist pool of the federation endpoints of one federation, tuned so that
// a dead member is declared within a few seconds (docs/federation.md, "Gossip").
type Pool struct {
	ml        *memberlist.Memberlist
	cfg       PoolConfig
	transport *countingTransport
	events    *poolEvents
	refused   *prometheus.CounterVec
	members   prometheus.Gauge
	sent      prometheus.Counter
	shutdown  sync.Once
}

// tunedConfig is memberlist's LAN profile with faster failure detection: probe every
// 500 ms (timeout 250 ms), suspicion at least 3 probe intervals and at most twice that,
// awareness backing off at most 2×. Federation pools are small (tens of meshes), so the
// extra probe traffic is a few packets per second per member.
func tunedConfig() *memberlist.Config {
	c := memberlist.DefaultLANConfig()
	c.ProbeInterval = 500 * time.Millisecond
	c.ProbeTimeout = 250 * time.Millisecond
	c.SuspicionMult = 3
	c.SuspicionMaxTimeoutMult = 2
	c.AwarenessMaxMultiplier = 2
	c.GossipInterval = 100 * time.Millisecond
	c.PushPullInterval = 10 * time.Second
	c.TCPTimeout = 2 * time.Second
	c.GossipToTheDeadTime = 10 * time.Second
	return c
}

// NewPool starts a member of the pool (it listens at once; Join connects it to others).
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.Name == "" {
		return nil, errors.New("federation: pool: no member name")
	}
	if cfg.FederationID == "" {
		return nil, errors.New("federation: pool: no federation ID")
	}
	key, err := GossipKey(cfg.Secret, cfg.FederationID)
	if err != nil {
		return nil, err
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "127.0.0.1"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	meta, err := json.Marshal(cfg.Meta)
	if err != nil {
		return nil, fmt.Errorf("federation: pool metadata: %w", err)
	}
	if len(meta) > memberlist.MetaMaxSize {
		return nil, fmt.Errorf("federation: pool metadata is %d bytes, memberlist allows %d", len(meta), memberlist.MetaMaxSize)
	}
	p := &Pool{cfg: cfg,
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_federation_gossip_refused_total",
			Help: "Gossip packets and streams dropped: label (another federation) or keyring (cannot decrypt)."}, []string{"reason"}),
		members: prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_federation_pool_members",
			Help: "Members of the federation's gossip pool this endpoint sees alive, itself included."}),
		sent: prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_federation_gossip_sent_bytes_total",
			Help: "Bytes this endpoint's gossip pool sent, counted at the transport: UDP packets and TCP streams, label and encryption included."}),
	}
	if cfg.Metrics != nil {
		// A pool restarted in the same process (a mesh that joins another federation)
		// keeps counting in the collectors its predecessor registered.
		if err := cfg.Metrics.Register(p.refused); err != nil {
			are, ok := err.(prometheus.AlreadyRegisteredError)
			if !ok {
				return nil, fmt.Errorf("federation: pool metrics: %w", err)
			}
			p.refused = are.ExistingCollector.(*prometheus.CounterVec)
		}
		if err := cfg.Metrics.Register(p.members); err != nil {
			are, ok := err.(prometheus.AlreadyRegisteredError)
			if !ok {
				return nil, fmt.Errorf("federation: pool metrics: %w", err)
			}
			p.members = are.ExistingCollector.(prometheus.Gauge)
		}
		if err := cfg.Metrics.Register(p.sent); err != nil {
			are, ok := err.(prometheus.AlreadyRegisteredError)
			if !ok {
				return nil, fmt.Errorf("federation: pool metrics: %w", err)
			}
			p.sent = are.ExistingCollector.(prometheus.Counter)
		}
	}
	mc := tunedConfig()
	if cfg.profile != nil {
		mc = cfg.profile()
	}
	logger := log.New(&logSink{p: p}, "", 0)
	tr, err := newCountingTransport(cfg.BindAddr, cfg.BindPort, logger, func(n int) { p.sent.Add(float64(n)) })
	if err != nil {
		return nil, fmt.Errorf("federation: start gossip on %s: %w", net.JoinHostPort(cfg.BindAddr, strconv.Itoa(cfg.BindPort)), err)
	}
	p.transport = tr
	mc.Transport = tr
	mc.Name = cfg.Name
	mc.BindAddr = cfg.BindAddr
	mc.BindPort = tr.GetAutoBindPort()
	mc.AdvertisePort = mc.BindPort
	mc.Label = PoolLabel(cfg.FederationID)
	mc.SecretKey = key
	mc.Delegate = metaDelegate(meta)
	p.events = &poolEvents{p: p}
	mc.Events = p.events
	mc.Logger = logger
	ml, err := memberlist.Create(mc)
	if err != nil {
		_ = tr.Shutdown()
		return nil, fmt.Errorf("federation: start gossip on %s: %w", net.JoinHostPort(cfg.BindAddr, strconv.Itoa(cfg.BindPort)), err)
	}
	p.ml = ml
	return p, nil
}

// Addr is the pool's gossip address, what others Join.
func (p *Pool) Addr() string {
	n := p.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// SentBytes is how many bytes the pool has sent so far, counted at the transport.
func (p *Pool) SentBytes() uint64 { return p.transport.Sent() }

// Join contacts the members at addrs and merges their view; it succeeds if any answered.
func (p *Pool) Join(addrs []string) error {
	if _, err := p.ml.Join(addrs); err != nil {
		return fmt.Errorf("federation: join pool at %s: %w", strings.Join(addrs, ", "), err)
	}
	return nil
}

// Members returns the members this one sees alive, itself included, sorted by name.
// They are copies taken in memberlist's events: memberlist's own Members hands out nodes
// it goes on changing under its lock.
func (p *Pool) Members() []Member {
	e := p.events
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]Member, 0, len(e.alive))
	for _, m := range e.alive {
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Alive reports whether the member called name is alive in the pool.
func (p *Pool) Alive(name string) bool {
	e := p.events
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.alive[name]
	return ok
}

// Run blocks until ctx is done, then leaves the pool (so the others see a departure, not
// a failure) and shuts down.
func (p *Pool) Run(ctx context.Context) error {
	<-ctx.Done()
	p.Close()
	return nil
}

// Close leaves the pool and shuts it down; safe to call more than once.
func (p *Pool) Close() {
	p.shutdown.Do(func() {
		_ = p.ml.Leave(time.Second)
		_ = p.ml.Shutdown()
	})
}

// Kill stops the member without leaving, as a crash would: the others must detect it.
func (p *Pool) Kill() {
	p.shutdown.Do(func() { _ = p.ml.Shutdown() })
}

func toMember(n *memberlist.Node, alive bool) Member {
	m := Member{Name: n.Name, Addr: net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))), Alive: alive}
	_ = json.Unmarshal(n.Meta, &m.Meta) // a member with unreadable metadata has none; its catalog stream will not be found
	return m
}

// metaDelegate publishes the node metadata and nothing else: no user messages and no
// push/pull state (the catalog travels on the per-peer stream, never in gossip).
type metaDelegate []byte

func (d metaDelegate) NodeMeta(limit int) []byte                  { return d }
func (d metaDelegate) NotifyMsg([]byte)                           {}
func (d metaDelegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d metaDelegate) LocalState(join bool) []byte                { return nil }
func (d metaDelegate) MergeRemoteState(buf []byte, join bool)     {}

// poolEvents follows memberlist's membership events. It keeps its own count because
// memberlist calls it during Create, before Pool.ml is set.
type poolEvents struct {
	p *Pool

	mu    sync.Mutex
	alive map[string]Member // guarded by mu
}

// notify runs with memberlist's node lock held, so n may be read here (and only here).
func (e *poolEvents) notify(n *memberlist.Node, alive bool) {
	m := toMember(n, alive)
	e.mu.Lock()
	if e.alive == nil {
		e.alive = map[string]Member{}
	}
	if alive {
		e.alive[n.Name] = m
	} else {
		delete(e.alive, n.Name)
	}
	e.p.members.Set(float64(len(e.alive)))
	e.mu.Unlock()
	if e.p.cfg.OnChange != nil && n.Name != e.p.cfg.Name {
		e.p.cfg.OnChange(m)
	}
}

func (e *poolEvents) NotifyJoin(n *memberlist.Node)   { e.notify(n, true) }
func (e *poolEvents) NotifyLeave(n *memberlist.Node)  { e.notify(n, false) }
func (e *poolEvents) NotifyUpdate(n *memberlist.Node) { e.notify(n, true) }

// logSink turns memberlist's log lines into slog records and counts the refusals it
// reports (memberlist has no hook for them): a foreign label, or a packet or stream no
// key of ours decrypts.
type logSink struct{ p *Pool }

func (s *logSink) Write(b []byte) (int, error) {
	line := string(bytes.TrimSpace(b))
	lower := strings.ToLower(line)
	switch {
	case strings.Contains(lower, "unacceptable label"):
		s.p.refused.WithLabelValues("label").Inc()
	case strings.Contains(lower, "decrypt packet failed"),
		strings.Contains(lower, "no installed keys could decrypt"),
		strings.Contains(lower, "remote state is not encrypted"):
		s.p.refused.WithLabelValues("keyring").Inc()
	}
	level := slog.LevelDebug
	if strings.Contains(line, "[ERR") || strings.Contains(line, "[WARN") {
		level = slog.LevelWarn
	}
	s.p.cfg.Log.Log(context.Background(), level, line, "component", "gossip")
	return len(b), nil
}

var _ io.Writer = (*logSink)(nil)
