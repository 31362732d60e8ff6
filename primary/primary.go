package primary

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
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
	// IstioClient, when set, reads VirtualServices and DestinationRules from that cluster
	// (once their CRDs exist) and routes by them; nil keeps the default routes.
	IstioClient istioclient.Interface
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
	// Debounce is the window that coalesces a burst of registry changes: the first change
	// after a quiet window is pushed at once, later ones at most this long after the last
	// push; default 100 ms.
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
	// Resolver looks up the names of resolution-DNS ServiceEntries; nil is
	// net.DefaultResolver.
	Resolver *net.Resolver
	// DNSRefresh is how often those names are looked up again; default 30 s.
	DNSRefresh time.Duration
	// Log receives events; nil discards them.
	Log *slog.Logger
	// Metrics registers the primary's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

// withDefaults validates c and returns it with every zero optional field set to its
// documented default.
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
	def(&c.DNSRefresh, 30*time.Second)
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
// the xDS server. New builds it, RegisterXDS mounts its ADS server, Run runs it; the
// debug handlers and Ready may be called from any goroutine.
type Primary struct {
	cfg      Config
	reg      *Registry
	clusters *Clusters
	cache    *viewCache
	builder  *Builder // used by the pusher only (Builder is not safe for concurrent use)
	// sidecarPlan is the Sidecars of the last push, for workloadViewKey (workload.go).
	sidecarPlan atomic.Pointer[sidecarPlan]
	metrics     *metrics
	// authMetrics count the secure port's decisions (auth.go).
	authMetrics *authMetrics
	config      *configState // traffic configuration status (configz.go)
	// entries are the ServiceEntry workload selectors the cluster watchers apply.
	entries *entrySelectors
	log     *slog.Logger
	// newView wakes the pusher when a proxy asks for a view nobody asked for before;
	// buffered 1, so noteView never blocks and repeated wakes coalesce.
	newView chan struct{}

	// mu guards the fields below. It is never held while building or publishing a view,
	// so connecting proxies and debug handlers never wait for a push.
	mu        sync.Mutex
	views     map[ViewKey]bool // every view some proxy has asked for; built on every push
	streams   map[int64]Proxy  // open xDS streams by go-control-plane's stream ID
	lastView  *View            // the registry view of the last push, for /debug
	pushes    uint64
	firstPush bool           // a push has completed; Ready waits for it
	secure    *secureStreams // the secure port's stream state, set by RegisterSecureXDS
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
		Entries: newEntrySelectors(),
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
	p.entries = wc.Entries
	p.cache = newViewCache(p.noteView)
	p.cache.keyOf = p.workloadViewKey
	p.builder = NewBuilder()
	p.metrics, err = newMetrics(cfg.Metrics, p.clusters.Statuses)
	if err != nil {
		return nil, err
	}
	if p.authMetrics, err = newAuthMetrics(cfg.Metrics); err != nil {
		return nil, err
	}
	if p.config, err = newConfigState(cfg.Metrics); err != nil {
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

// callbacks admit streams and count them: every request must carry a node the primary
// can classify (ProxyFromNode; go-control-plane copies a stream's first node into its
// later requests), or the stream is refused and counted; a request carrying an error
// detail is a NACK and is counted by type URL.
func (p *Primary) callbacks() server.Callbacks {
	check := func(id int64, n *core.Node, typeURL string, nack bool) error {
		if typeURL == resource.SecretType {
			p.metrics.rejected.Inc()
			return fmt.Errorf("primary: refusing xDS stream: secrets (SDS) are served only on the authenticated port")
		}
		proxy, err := ProxyFromNode(n)
		if err != nil {
			p.metrics.rejected.Inc()
			return fmt.Errorf("primary: refusing xDS stream: %w", err)
		}
		if k, err := p.workloadViewKey(n); err == nil {
			proxy.Workload = k.Workload // as of this request: relabelling moves it
		}
		p.mu.Lock()
		if _, ok := p.streams[id]; !ok {
			p.metrics.proxies.Inc()
		}
		p.streams[id] = proxy
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

// Run watches clusters and pushes configuration until ctx ends. It returns only after
// every goroutine it started has exited (watchers, source polling, metrics), so nothing
// writes the registry or the metrics after it returns. The error is the remote-secret
// watch's, if it could not start.
func (p *Primary) Run(ctx context.Context) error {
	// The local cluster is added before anything can push, so that Ready never reports
	// a primary that has not yet started watching its own cluster.
	p.clusters.addLocal(p.cfg.ClusterID, p.cfg.LocalClient)
	var wg sync.WaitGroup
	var clustersErr error
	wg.Add(2)
	go func() {
		defer wg.Done()
		clustersErr = p.clusters.run(ctx, p.cfg.LocalClient, p.cfg.Namespace, p.cfg.KubeconfigDir)
	}()
	go func() {
		defer wg.Done()
		p.metrics.loop(ctx)
	}()
	var istioErr, secErr, ingErr error
	if p.cfg.IstioClient != nil {
		w := &istioConfigWatcher{client: p.cfg.IstioClient, discovery: p.cfg.LocalClient.Discovery(), reg: p.reg, cluster: p.cfg.ClusterID,
			domain: p.cfg.Domain, poll: p.cfg.ProbeInterval, log: p.log, absent: func() { p.config.noCRDs.Store(true) },
			resolver: newEntryResolver(p.cfg.Resolver, p.cfg.DNSRefresh), entries: p.entries}
		wg.Go(func() { istioErr = w.run(ctx) })
		sw := &securityConfigWatcher{client: p.cfg.IstioClient, discovery: p.cfg.LocalClient.Discovery(), reg: p.reg,
			root: p.cfg.Namespace, poll: p.cfg.ProbeInterval, log: p.log}
		wg.Go(func() { secErr = sw.run(ctx) })
		iw := &ingressConfigWatcher{istio: p.cfg.IstioClient, kube: p.cfg.LocalClient, discovery: p.cfg.LocalClient.Discovery(), reg: p.reg,
			namespace: p.cfg.Namespace, poll: p.cfg.ProbeInterval, log: p.log}
		wg.Go(func() { ingErr = iw.run(ctx) }) // ingressconfig.go
		wg.Go(func() { p.config.runEvents(ctx, p.cfg.LocalClient, p.log) })
	} else {
		p.reg.SetSecurityConfig(&SecurityConfig{RootNamespace: p.cfg.Namespace}) // no policy can exist
	}
	err := p.pushLoop(ctx) // returns when ctx ends, like the two above
	wg.Wait()
	if err == nil {
		err = cmp.Or(clustersErr, istioErr, secErr, ingErr)
	}
	return err
}

// pushLoop rebuilds and publishes every view after registry changes: an isolated change
// is pushed at once, and a burst is coalesced into pushes at most one debounce window
// apart (see coalescePushes).
func (p *Primary) pushLoop(ctx context.Context) error {
	p.push(ctx) // an empty but valid first configuration
	after := func(d time.Duration) (<-chan time.Time, func()) {
		t := time.NewTimer(d)
		return t.C, func() { t.Stop() }
	}
	coalescePushes(ctx, p.reg.Changed(), p.newView, p.cfg.Debounce, after, func() { p.push(ctx) })
	return nil // ctx ended, like the watchers'
}

// coalescePushes calls push for changes received on changed or newView until ctx ends,
// with a leading edge: the first change after a quiet window is pushed at once, and
// changes that arrive within window of a push are held and pushed together when that
// window ends, which starts a new window. So a lone change waits for no timer, a change
// inside a burst waits at most one window (plus the push in progress), and a steady
// stream of changes costs one push per window. after starts a timer and returns its
// channel and a stop function; it is a parameter so that tests drive the clock.
func coalescePushes(ctx context.Context, changed, newView <-chan struct{}, window time.Duration,
	after func(time.Duration) (<-chan time.Time, func()), push func()) {
	for {
		select { // quiet: nothing pushed within the last window
		case <-ctx.Done():
			return
		case <-changed:
		case <-newView:
		}
		push() // leading edge
		for {
			expired, stop := after(window)
			pending := false
		window:
			for {
				select {
				case <-ctx.Done():
					stop()
					return
				case <-changed:
					pending = true
				case <-newView:
					pending = true
				case <-expired:
					break window
				}
			}
			if !pending {
				break // the window passed without changes: quiet again
			}
			push() // trailing edge: every change held during the window
		}
	}
}

// push builds every requested view from one registry view and publishes it. A view that
// fails to build or publish is logged and counted, and keeps its previous resources: one
// bad view never blocks the others.
func (p *Primary) push(ctx context.Context) {
	start := time.Now()
	v := p.reg.View()
	for _, g := range p.cfg.Gateways {
		v.Gateways[g.Network] = append(v.Gateways[g.Network], g)
	}
	// Watches whose proxy a Sidecar with workloadSelector now scopes differently (or no
	// longer) move to their new view before the views are built (workload.go).
	sp := p.builder.trafficPlanFor(v).sidecars
	if old := p.sidecarPlan.Swap(sp); old.anySelectors() || sp.anySelectors() {
		// Only a proxy on a selector view, or in a namespace with selector Sidecars, can
		// have a new key.
		p.cache.rekey(func(k ViewKey) bool { return k.Workload != "" || sp.hasSelectors(k.Namespace) })
	}
	p.mu.Lock()
	p.pushes++
	keys := make([]ViewKey, 0, len(p.views))
	for k := range p.views {
		keys = append(keys, k)
	}
	p.lastView = v
	p.mu.Unlock()
	p.config.record(slices.Concat(p.builder.trafficPlanFor(v).status, p.builder.securityPlanFor(v).status))
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
	if v.Traffic != nil {
		p.config.pushed.Store(true) // every view now carries the traffic configuration
	}
	p.mu.Lock()
	p.firstPush = true
	p.mu.Unlock()
	p.metrics.pushes.Inc()
	p.metrics.pushSeconds.Observe(time.Since(start).Seconds())
}

// Ready reports whether the primary has pushed once, every cluster has finished (or
// given up) its first sync, and, when it reads Istio configuration, a push has carried it
// (or the config cluster has no Istio CRDs).
func (p *Primary) Ready() bool {
	p.mu.Lock()
	first := p.firstPush
	p.mu.Unlock()
	return first && p.clusters.Ready() && (p.cfg.IstioClient == nil || p.config.ready())
}

// Client returns a client for a watched cluster (the local one or a linked remote), for
// components that act on the caller's own cluster, such as the CA's TokenReviews. It
// satisfies trust.ClusterClients.
func (p *Primary) Client(cluster mesh.ClusterID) (kubernetes.Interface, bool) {
	return p.clusters.client(cluster)
}
