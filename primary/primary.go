package primary

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
)

// Config configures a Primary. Zero values of optional fields are the documented defaults.
type Config struct {
	// ClusterID is the ID of the cluster the primary runs in (its config cluster); required.
	ClusterID mesh.ClusterID
	// LocalClient talks to that cluster; required.
	LocalClient kubernetes.Interface
	// Namespace holds the remote secrets; default istio-system. It is also the system
	// namespace whose topology.istio.io/network label names each cluster's network.
	Namespace string
	// KubeconfigDir, when set, is polled for one kubeconfig file per remote cluster (file
	// name without extension = cluster ID).
	KubeconfigDir string
	// KubeconfigPolicy says which risky kubeconfig features remote credentials may use;
	// the zero value allows none.
	KubeconfigPolicy remote.Policy
	// SyncTimeout bounds how long a cluster's first sync may hold readiness back; default
	// 10 s. A cluster that takes longer is marked timeout and keeps syncing.
	SyncTimeout time.Duration
	// StaleWindow is how long an unreachable cluster's endpoints are kept; default 60 s
	// (see docs/primary.md for why).
	StaleWindow time.Duration
	// ProbeInterval is how often each cluster's API server is probed; default 5 s.
	ProbeInterval time.Duration
	// Debounce coalesces registry changes for this long before a push; default 100 ms.
	Debounce time.Duration
	// Domain is the cluster DNS domain; default cluster.local.
	Domain string
	// TrustDomain makes workload identities; default cluster.local.
	TrustDomain mesh.TrustDomain
	// DefaultNetwork is the network of clusters whose system namespace has no network
	// label; empty means "one flat network".
	DefaultNetwork mesh.NetworkID
	// NetworkCIDRs assigns endpoints to networks by address when pod and namespace labels
	// do not.
	NetworkCIDRs []NetworkCIDR
	// Gateways are configured network gateways, in addition to discovered ones.
	Gateways []Gateway
	// ClusterLocalNamespaces never leave their cluster; default [kube-system].
	ClusterLocalNamespaces []string
	// ClusterLocalHosts never leave their cluster; default [kubernetes.default.svc.<domain>].
	ClusterLocalHosts []mesh.Hostname
	// Log receives events; nil discards them.
	Log *slog.Logger
	// Metrics registers the primary's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

func (c Config) withDefaults() (Config, error) {
	if c.ClusterID == "" || c.LocalClient == nil {
		return c, errors.New("primary: ClusterID and LocalClient are required")
	}
	if _, err := mesh.ParseClusterID(string(c.ClusterID)); err != nil {
		return c, fmt.Errorf("primary: %w", err)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.SyncTimeout, 10*time.Second)
	def(&c.StaleWindow, 60*time.Second)
	def(&c.ProbeInterval, 5*time.Second)
	def(&c.Debounce, 100*time.Millisecond)
	if c.Namespace == "" {
		c.Namespace = remote.DefaultNamespace
	}
	if c.Domain == "" {
		c.Domain = mesh.DefaultDomain
	}
	if c.TrustDomain == "" {
		c.TrustDomain = "cluster.local"
	}
	if c.ClusterLocalNamespaces == nil {
		c.ClusterLocalNamespaces = []string{"kube-system"}
	}
	if c.ClusterLocalHosts == nil {
		c.ClusterLocalHosts = []mesh.Hostname{mesh.ServiceKey{Namespace: "default", Name: "kubernetes"}.Hostname(c.Domain)}
	}
	if c.Log == nil {
		c.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.Metrics == nil {
		c.Metrics = prometheus.NewRegistry()
	}
	return c, nil
}

// Primary is the control plane: cluster watchers, the registry, the snapshot builder and
// the xDS server.
type Primary struct {
	cfg      Config
	reg      *Registry
	clusters *Clusters
	cache    *viewCache
	builder  *Builder // used by the pusher only
	metrics  *metrics
	log      *slog.Logger
	newView  chan struct{}

	mu sync.Mutex
	// views, streams, lastView, pushes and firstPush are guarded by mu.
	views     map[ViewKey]bool
	streams   map[int64]Proxy
	lastView  *View
	pushes    uint64
	firstPush bool
}

// New validates cfg and returns a primary; Run starts it.
func New(cfg Config) (*Primary, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	wc := watcherConfig{
		SyncTimeout: cfg.SyncTimeout, StaleWindow: cfg.StaleWindow, ProbeInterval: cfg.ProbeInterval,
		Domain: cfg.Domain, TrustDomain: cfg.TrustDomain, SystemNamespace: cfg.Namespace,
		DefaultNetwork: cfg.DefaultNetwork, CIDRs: cfg.NetworkCIDRs,
		LocalNamespaces: map[string]bool{}, LocalHosts: map[mesh.Hostname]bool{}, Log: cfg.Log,
	}
	for _, ns := range cfg.ClusterLocalNamespaces {
		wc.LocalNamespaces[ns] = true
	}
	for _, h := range cfg.ClusterLocalHosts {
		wc.LocalHosts[h] = true
	}
	p := &Primary{
		cfg:     cfg,
		reg:     NewRegistry(),
		log:     cfg.Log,
		newView: make(chan struct{}, 1),
		views:   map[ViewKey]bool{},
		streams: map[int64]Proxy{},
	}
	p.clusters = newClusters(p.reg, wc, cfg.KubeconfigPolicy)
	p.cache = newViewCache(p.noteView)
	p.builder = NewBuilder()
	p.metrics, err = newMetrics(cfg.Metrics, p)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// Registry returns the primary's registry (for other sources and tests).
func (p *Primary) Registry() *Registry { return p.reg }

// Clusters returns the cluster statuses.
func (p *Primary) Clusters() []ClusterStatus { return p.clusters.Statuses() }

// noteView records a view a proxy asked for and wakes the pusher to build it. It is
// called under the cache's lock, so it only flips state and signals.
func (p *Primary) noteView(key ViewKey) {
	p.mu.Lock()
	p.views[key] = true
	p.mu.Unlock()
	select {
	case p.newView <- struct{}{}:
	default:
	}
}

// RegisterXDS registers the aggregated discovery service (state of the world and delta)
// on s. The server stops its streams when ctx ends.
func (p *Primary) RegisterXDS(ctx context.Context, s *grpc.Server) {
	srv := server.NewServer(ctx, p.cache, p.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(s, srv)
}

func (p *Primary) callbacks() server.Callbacks {
	check := func(id int64, n *core.Node, typeURL string, nack bool) error {
		proxy, err := ProxyFromNode(n)
		if err != nil {
			p.metrics.rejected.Inc()
			return fmt.Errorf("primary: refusing xDS stream: %w", err)
		}
		p.mu.Lock()
		if _, ok := p.streams[id]; !ok {
			p.streams[id] = proxy
			p.metrics.proxies.Inc()
		}
		p.mu.Unlock()
		if nack {
			p.metrics.nacks.WithLabelValues(typeURL).Inc()
		}
		return nil
	}
	closed := func(id int64, _ *core.Node) {
		p.mu.Lock()
		if _, ok := p.streams[id]; ok {
			delete(p.streams, id)
			p.metrics.proxies.Dec()
		}
		p.mu.Unlock()
	}
	return server.CallbackFuncs{
		StreamRequestFunc: func(id int64, r *discovery.DiscoveryRequest) error {
			return check(id, r.GetNode(), r.GetTypeUrl(), r.GetErrorDetail() != nil)
		},
		StreamDeltaRequestFunc: func(id int64, r *discovery.DeltaDiscoveryRequest) error {
			return check(id, r.GetNode(), r.GetTypeUrl(), r.GetErrorDetail() != nil)
		},
		StreamClosedFunc:      closed,
		DeltaStreamClosedFunc: closed,
	}
}

// Run watches clusters and pushes configuration until ctx ends.
func (p *Primary) Run(ctx context.Context) error {
	p.clusters.addLocal(p.cfg.ClusterID, p.cfg.LocalClient)
	defer p.clusters.stopAll()
	errc := make(chan error, 2)
	go func() { errc <- p.clusters.watchSecrets(ctx, p.cfg.LocalClient, p.cfg.Namespace) }()
	if p.cfg.KubeconfigDir != "" {
		go func() {
			t := time.NewTicker(5 * time.Second)
			defer t.Stop()
			for {
				if err := p.clusters.scanDir(p.cfg.KubeconfigDir); err != nil {
					p.log.Warn("kubeconfig directory", "err", err)
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	go p.metrics.loop(ctx)
	err := p.pushLoop(ctx)
	if e := <-errc; e != nil && err == nil {
		err = e
	}
	return err
}

// pushLoop rebuilds and publishes every view after registry changes, coalescing changes
// that arrive within the debounce window.
func (p *Primary) pushLoop(ctx context.Context) error {
	p.push(ctx) // an empty but valid first configuration
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-p.reg.Changed():
		case <-p.newView:
		}
		timer := time.NewTimer(p.cfg.Debounce)
	debounce:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				return nil
			case <-p.reg.Changed():
			case <-p.newView:
			case <-timer.C:
				break debounce
			}
		}
		p.push(ctx)
	}
}

func (p *Primary) push(ctx context.Context) {
	start := time.Now()
	v := p.reg.View()
	for _, g := range p.cfg.Gateways {
		v.Gateways[g.Network] = append(v.Gateways[g.Network], g)
	}
	p.mu.Lock()
	p.pushes++
	keys := make([]ViewKey, 0, len(p.views))
	for k := range p.views {
		keys = append(keys, k)
	}
	p.lastView = v
	p.mu.Unlock()
	for _, k := range keys {
		res, err := p.builder.Build(v, k)
		if err == nil {
			err = p.cache.SetView(k, res)
		}
		if err != nil {
			p.metrics.pushErrors.Inc()
			p.log.Error("push", "view", k, "err", err)
		}
	}
	p.mu.Lock()
	p.firstPush = true
	p.mu.Unlock()
	p.metrics.pushes.Inc()
	p.metrics.pushSeconds.Observe(time.Since(start).Seconds())
}

// Ready reports whether the primary has pushed once and every cluster has finished (or
// given up) its first sync.
func (p *Primary) Ready() bool {
	p.mu.Lock()
	first := p.firstPush
	p.mu.Unlock()
	return first && p.clusters.Ready()
}

// Client returns a client for a watched cluster (the local one or a linked remote), for
// components that act on the caller's own cluster, such as the CA's TokenReviews. It
// satisfies trust.ClusterClients.
func (p *Primary) Client(cluster mesh.ClusterID) (kubernetes.Interface, bool) {
	return p.clusters.client(cluster)
}
