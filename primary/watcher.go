package primary

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// ClusterState is where a cluster's link stands.
type ClusterState string

// Cluster states; see docs/primary.md.
const (
	StateSyncing     ClusterState = "syncing"
	StateSynced      ClusterState = "synced"
	StateTimeout     ClusterState = "timeout"
	StateUnreachable ClusterState = "unreachable"
	StateRemoved     ClusterState = "removed"
	StateError       ClusterState = "error"
)

// ClusterStatus is what /debug/clusterz and `isthmus status` show for one cluster.
type ClusterStatus struct {
	ID         mesh.ClusterID `json:"id"`
	Source     string         `json:"source"` // "local", "secret ns/name" or "file path"
	State      ClusterState   `json:"state"`
	Since      time.Time      `json:"since"`              // when State was entered
	LastSync   time.Time      `json:"lastSync,omitzero"`  // last successful sync or probe
	Staleness  string         `json:"staleness,omitzero"` // how long data has gone unrefreshed, while unreachable
	Withdrawn  bool           `json:"withdrawn,omitzero"` // endpoints withdrawn after the stale window
	Services   int            `json:"services"`
	Endpoints  int            `json:"endpoints"`
	Error      string         `json:"error,omitzero"`
	Credential string         `json:"credential,omitzero"` // short hash of the credential in use
	Rotating   bool           `json:"rotating,omitzero"`   // a new credential is syncing
	PendingErr string         `json:"pendingError,omitzero"`
}

// watcherConfig is what a clusterWatcher needs from the primary's configuration.
type watcherConfig struct {
	SyncTimeout     time.Duration
	StaleWindow     time.Duration
	ProbeInterval   time.Duration
	Domain          string
	TrustDomain     mesh.TrustDomain
	SystemNamespace string
	DefaultNetwork  mesh.NetworkID // when the cluster's system namespace has no network label
	CIDRs           []NetworkCIDR
	LocalNamespaces map[string]bool
	LocalHosts      map[mesh.Hostname]bool
	Log             *slog.Logger
}

// clusterWatcher watches one cluster and keeps its registry shard current. It is a
// level-triggered controller: informer events queue service keys; a key is reconciled
// from the caches into one registry update.
type clusterWatcher struct {
	id     mesh.ClusterID
	source string
	client kubernetes.Interface
	reg    *Registry
	shard  ShardKey
	cfg    watcherConfig
	log    *slog.Logger

	queue     workqueue.TypedRateLimitingInterface[string]
	services  cache.Indexer
	slices    cache.Indexer
	pods      cache.Indexer
	nodes     cache.Indexer
	ns        cache.Indexer
	tr        translator
	syncedCh  chan struct{} // closed once the caches have synced
	enableCh  chan struct{} // closed when the watcher may write its shard
	enableOne sync.Once
	cancel    context.CancelFunc
	done      chan struct{}
	credHash  [32]byte // of the kubeconfig this watcher uses (zero for the local cluster)

	mu sync.Mutex
	// status is guarded by mu.
	status ClusterStatus
	// withdrawn and unreachableSince are guarded by mu.
	withdrawn        bool
	unreachableSince time.Time
	synced           bool
}

const gatewaysKey = "\x00gateways" // queue key that recomputes the cluster's gateways

func newClusterWatcher(id mesh.ClusterID, source string, client kubernetes.Interface, reg *Registry, cfg watcherConfig) *clusterWatcher {
	w := &clusterWatcher{
		id: id, source: source, client: client, reg: reg, cfg: cfg,
		shard:    ShardKey{Source: SourceKubernetes, Cluster: id},
		log:      cfg.Log.With("cluster", id),
		syncedCh: make(chan struct{}),
		enableCh: make(chan struct{}),
		done:     make(chan struct{}),
		status:   ClusterStatus{ID: id, Source: source, State: StateSyncing, Since: time.Now()},
	}
	return w
}

// start runs the watcher in the background until stop is called.
func (w *clusterWatcher) start() {
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() {
		defer close(w.done)
		w.run(ctx)
	}()
}

// stop ends the watcher and waits for it. It does not touch the registry shard.
func (w *clusterWatcher) stop() {
	w.cancel()
	<-w.done
}

// enable lets the watcher write its shard: it publishes everything once synced.
func (w *clusterWatcher) enable() { w.enableOne.Do(func() { close(w.enableCh) }) }

func (w *clusterWatcher) setState(s ClusterState, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.status.State != s {
		w.status.State = s
		w.status.Since = time.Now()
		w.log.Info("cluster state", "state", s, "err", err)
	}
	if err != nil {
		w.status.Error = err.Error()
	} else if s == StateSynced {
		w.status.Error = ""
	}
}

func (w *clusterWatcher) recordError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.status.Error = err.Error()
}

// Status returns the watcher's current status.
func (w *clusterWatcher) Status() ClusterStatus {
	w.mu.Lock()
	s := w.status
	s.Withdrawn = w.withdrawn
	if !w.unreachableSince.IsZero() {
		s.Staleness = time.Since(w.unreachableSince).Round(time.Second).String()
	}
	w.mu.Unlock()
	sd := w.reg.Shard(w.shard)
	if sd != nil {
		s.Services = len(sd.Services)
		s.Endpoints = sd.EndpointCount()
	}
	return s
}

func (w *clusterWatcher) run(ctx context.Context) {
	w.queue = workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer w.queue.ShutDown()
	factory := informers.NewSharedInformerFactory(w.client, 0)
	type inf struct {
		what string
		i    cache.SharedIndexInformer
	}
	infs := []inf{
		{"services", factory.Core().V1().Services().Informer()},
		{"endpointslices", factory.Discovery().V1().EndpointSlices().Informer()},
		{"pods", factory.Core().V1().Pods().Informer()},
		{"nodes", factory.Core().V1().Nodes().Informer()},
		{"namespaces", factory.Core().V1().Namespaces().Informer()},
	}
	for _, x := range infs {
		what := x.what
		// Surface list/watch failures (RBAC, TLS, unreachable) in the cluster's status.
		_ = x.i.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
			w.recordError(fmt.Errorf("list/watch %s: %w", what, err))
		})
	}
	w.services = infs[0].i.GetIndexer()
	w.slices = infs[1].i.GetIndexer()
	w.pods = infs[2].i.GetIndexer()
	w.nodes = infs[3].i.GetIndexer()
	w.ns = infs[4].i.GetIndexer()
	w.tr = translator{
		cluster:     w.id,
		trustDomain: w.cfg.TrustDomain,
		domain:      w.cfg.Domain,
		cidrs:       w.cfg.CIDRs,
		pod:         getter[*corev1.Pod](w.pods),
		node:        func(name string) *corev1.Node { return getter[*corev1.Node](w.nodes)("", name) },
		namespace:   func(name string) *corev1.Namespace { return getter[*corev1.Namespace](w.ns)("", name) },
	}
	w.addHandlers(infs[0].i, infs[1].i, infs[2].i, infs[3].i, infs[4].i)
	factory.Start(ctx.Done())
	defer factory.Shutdown()

	go w.probe(ctx)
	syncTimer := time.NewTimer(w.cfg.SyncTimeout)
	defer syncTimer.Stop()
	syncDone := make(chan bool, 1)
	go func() {
		syncDone <- cache.WaitForCacheSync(ctx.Done(),
			infs[0].i.HasSynced, infs[1].i.HasSynced, infs[2].i.HasSynced, infs[3].i.HasSynced, infs[4].i.HasSynced)
	}()
wait:
	for {
		select {
		case <-ctx.Done():
			return
		case <-syncTimer.C:
			w.mu.Lock()
			syncing := w.status.State == StateSyncing
			w.mu.Unlock()
			if syncing {
				w.setState(StateTimeout, fmt.Errorf("first sync not done after %s", w.cfg.SyncTimeout))
			}
		case ok := <-syncDone:
			if !ok {
				return
			}
			break wait
		}
	}
	w.mu.Lock()
	w.synced = true
	w.status.LastSync = time.Now()
	w.mu.Unlock()
	w.setState(StateSynced, nil)
	close(w.syncedCh)

	select {
	case <-ctx.Done():
		return
	case <-w.enableCh:
	}
	w.publishAll()
	go func() {
		<-ctx.Done()
		w.queue.ShutDown()
	}()
	for w.processNext() {
	}
}

func getter[T any](idx cache.Indexer) func(namespace, name string) T {
	return func(namespace, name string) T {
		var zero T
		key := name
		if namespace != "" {
			key = namespace + "/" + name
		}
		obj, ok, err := idx.GetByKey(key)
		if err != nil || !ok {
			return zero
		}
		t, _ := obj.(T)
		return t
	}
}

func (w *clusterWatcher) addHandlers(svcs, slices, pods, nodes, nss cache.SharedIndexInformer) {
	svcHandler := func(obj any) {
		if s, ok := unwrap[*corev1.Service](obj); ok {
			w.queue.Add(s.Namespace + "/" + s.Name)
			if s.Labels[LabelNetwork] != "" || len(w.reg.Shard(w.shard).gatewaysOrNil()) > 0 {
				w.queue.Add(gatewaysKey)
			}
		}
	}
	_, _ = svcs.AddEventHandler(handlerFuncs(svcHandler))
	_, _ = slices.AddEventHandler(handlerFuncs(func(obj any) {
		if s, ok := unwrap[*discoveryv1.EndpointSlice](obj); ok {
			if name := s.Labels[discoveryv1.LabelServiceName]; name != "" {
				w.queue.Add(s.Namespace + "/" + name)
			}
		}
	}))
	_, _ = pods.AddEventHandler(handlerFuncs(func(obj any) {
		p, ok := unwrap[*corev1.Pod](obj)
		if !ok {
			return
		}
		// Requeue the services that select the pod: its labels or identity may matter.
		for _, o := range w.services.List() {
			s := o.(*corev1.Service)
			if s.Namespace == p.Namespace && len(s.Spec.Selector) > 0 &&
				labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(p.Labels)) {
				w.queue.Add(s.Namespace + "/" + s.Name)
			}
		}
	}))
	all := func(any) { w.requeueAll() } // locality and network labels affect every endpoint
	_, _ = nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(o, n any) {
		if !labelsEqual(o, n) {
			all(n)
		}
	}})
	_, _ = nss.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(o, n any) {
		if !labelsEqual(o, n) {
			all(n)
		}
	}, AddFunc: all})
}

func labelsEqual(a, b any) bool {
	ao, ok1 := a.(interface{ GetLabels() map[string]string })
	bo, ok2 := b.(interface{ GetLabels() map[string]string })
	if !ok1 || !ok2 {
		return false
	}
	x, y := ao.GetLabels(), bo.GetLabels()
	if len(x) != len(y) {
		return false
	}
	for k, v := range x {
		if y[k] != v {
			return false
		}
	}
	return true
}

func (d *ShardData) gatewaysOrNil() []Gateway {
	if d == nil {
		return nil
	}
	return d.Gateways
}

func handlerFuncs(f func(any)) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{AddFunc: f, UpdateFunc: func(_, n any) { f(n) }, DeleteFunc: f}
}

func unwrap[T any](obj any) (T, bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	t, ok := obj.(T)
	return t, ok
}

func (w *clusterWatcher) requeueAll() {
	for _, key := range w.services.ListKeys() {
		w.queue.Add(key)
	}
	w.queue.Add(gatewaysKey)
}

func (w *clusterWatcher) processNext() bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	w.mu.Lock()
	withdrawn := w.withdrawn
	w.mu.Unlock()
	if withdrawn {
		w.queue.Forget(key) // publishAll runs when the link is back
		return true
	}
	if key == gatewaysKey {
		w.reg.UpdateGateways(w.shard, w.gateways())
	} else {
		host, svc, eps := w.translateKey(key)
		w.reg.UpdateService(w.shard, host, svc, eps)
	}
	w.queue.Forget(key)
	return true
}

// defaultNetwork is the label of the cluster's system namespace, else the configured one.
func (w *clusterWatcher) defaultNetwork() mesh.NetworkID {
	if ns := getter[*corev1.Namespace](w.ns)("", w.cfg.SystemNamespace); ns != nil {
		if n, err := mesh.ParseNetworkID(ns.Labels[LabelNetwork]); err == nil {
			return n
		}
	}
	return w.cfg.DefaultNetwork
}

// translateKey computes one service's registry entry from the caches; svc is nil when
// the service is gone or stays inside its cluster.
func (w *clusterWatcher) translateKey(key string) (mesh.Hostname, *Service, []mesh.Endpoint) {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	host := mesh.ServiceKey{Namespace: ns, Name: name}.Hostname(w.cfg.Domain)
	if w.cfg.LocalNamespaces[ns] || w.cfg.LocalHosts[host] {
		return host, nil, nil
	}
	s := getter[*corev1.Service](w.services)(ns, name)
	if s == nil {
		return host, nil, nil
	}
	svc, ok := w.tr.service(s)
	if !ok {
		return host, nil, nil
	}
	objs, _ := w.slices.ByIndex(cache.NamespaceIndex, ns)
	var slices []*discoveryv1.EndpointSlice
	for _, o := range objs {
		if sl := o.(*discoveryv1.EndpointSlice); sl.Labels[discoveryv1.LabelServiceName] == name {
			slices = append(slices, sl)
		}
	}
	tr := w.tr
	tr.defaultNetwork = w.defaultNetwork()
	return host, svc, tr.endpoints(s, slices)
}

func (w *clusterWatcher) gateways() []Gateway {
	var out []Gateway
	for _, o := range w.services.List() {
		out = append(out, gatewaysOf(w.id, o.(*corev1.Service))...)
	}
	return out
}

// publishAll replaces the shard with everything in the caches, at once.
func (w *clusterWatcher) publishAll() {
	data := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}, Gateways: w.gateways()}
	for _, key := range w.services.ListKeys() {
		host, svc, eps := w.translateKey(key)
		if svc != nil {
			data.Services[host] = svc
			data.Endpoints[host] = eps
		}
	}
	w.reg.ReplaceShard(w.shard, data)
}

// probe checks the API server every ProbeInterval and applies the link-health policy:
// unreachable clusters keep their endpoints for StaleWindow, then lose them; a cluster
// that answers again is republished.
func (w *clusterWatcher) probe(ctx context.Context) {
	rc := w.client.Discovery().RESTClient()
	if rc == nil {
		w.log.Warn("client cannot probe its API server; link health is not tracked for this cluster")
		return
	}
	t := time.NewTicker(w.cfg.ProbeInterval)
	defer t.Stop()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, max(w.cfg.ProbeInterval, time.Second))
		err := rc.Get().AbsPath("/readyz").Do(pctx).Error()
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil && !apierrors.IsForbidden(err) && !apierrors.IsUnauthorized(err) {
			failures++
			if failures < 2 {
				continue // one lost probe is noise
			}
			w.mu.Lock()
			if w.unreachableSince.IsZero() {
				w.unreachableSince = time.Now().Add(-time.Duration(failures-1) * w.cfg.ProbeInterval)
			}
			since := w.unreachableSince
			enabled := isClosed(w.enableCh)
			shouldWithdraw := !w.withdrawn && enabled && time.Since(since) >= w.cfg.StaleWindow
			if shouldWithdraw {
				w.withdrawn = true
			}
			w.mu.Unlock()
			w.setState(StateUnreachable, fmt.Errorf("API server probe: %w", err))
			if shouldWithdraw {
				w.log.Warn("withdrawing endpoints of unreachable cluster", "stale_for", time.Since(since).Round(time.Second), "window", w.cfg.StaleWindow)
				w.reg.ReplaceShard(w.shard, nil)
			}
			continue
		}
		failures = 0
		w.mu.Lock()
		wasUnreachable := !w.unreachableSince.IsZero()
		wasWithdrawn := w.withdrawn
		w.unreachableSince = time.Time{}
		w.withdrawn = false
		synced := w.synced
		if synced {
			w.status.LastSync = time.Now()
		}
		w.mu.Unlock()
		if wasUnreachable && synced {
			w.setState(StateSynced, nil)
			if wasWithdrawn {
				w.log.Info("cluster reachable again; republishing")
				w.publishAll()
			}
		}
	}
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
