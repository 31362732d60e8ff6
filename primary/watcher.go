package primary

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// watcherConfig is what a clusterWatcher needs from the primary's configuration; New
// fills it from Config with the defaults applied. LocalNamespaces and LocalHosts are
// shared by every watcher and never written after New.
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
	// Entries are the applied ServiceEntry workloadSelectors (shared by every watcher,
	// written by the config watcher): each watcher adds its cluster's selected pods to
	// its shard as endpoints of the entries' hosts. Nil selects nothing.
	Entries *entrySelectors
	Log     *slog.Logger
}

// clusterWatcher watches one cluster and keeps its registry shard current. It is a
// level-triggered controller: informer events queue service keys; a key is reconciled
// from the caches into one registry update.
//
// Lifecycle: start runs it; it syncs its caches (syncedCh), then waits to be enabled
// (enableCh) before it writes the shard, so that a rotated credential's watcher can sync
// beside the active one without both writing; stop cancels it and waits for every
// goroutine it started. The fields from queue to tr are set by run before any handler
// or probe reads them, and then only read.
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
	// readyz, when set, replaces the probe of the API server's /readyz (tests).
	readyz func(context.Context) error

	// writeMu serializes the watcher's writes of its shard, each with the reads of the
	// caches it is computed from: a reconcile, a full publish, a withdrawal. Without it a
	// publish computed before a reconcile could land after it (stale data until the next
	// event), or a reconcile that saw withdrawn unset could land after the withdrawal.
	// It is held across registry calls, never across I/O; mu may be taken inside it.
	writeMu sync.Mutex
	// entryHosts are the ServiceEntry hosts the last write gave selected pods' endpoints
	// (so that the next one removes those no longer selected); guarded by writeMu.
	entryHosts map[mesh.Hostname]bool

	// mu guards the fields below it. It is held only for reads and writes of them, never
	// across a registry call or I/O.
	mu               sync.Mutex
	status           ClusterStatus
	withdrawn        bool      // the link-health policy emptied the shard; processNext drops keys
	unreachableSince time.Time // zero while the API server answers
	synced           bool      // the caches have synced once
}

// gatewaysKey is the queue key that recomputes the cluster's gateways. The NUL byte keeps
// it apart from every namespace/name key.
const gatewaysKey = "\x00gateways"

// entriesKey is the queue key that recomputes the endpoints ServiceEntry workload
// selectors make of the cluster's pods.
const entriesKey = "\x00entries"

// newClusterWatcher returns a watcher of cluster id through client, in state syncing;
// start runs it.
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

// start runs the watcher in the background until stop is called. The watcher's context
// is its own, not the caller's: only stop ends it, so that Clusters decides when.
func (w *clusterWatcher) start() {
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() {
		defer close(w.done)
		w.run(ctx)
	}()
}

// stop ends the watcher and waits for it and every goroutine it started (informers,
// probe). It does not touch the registry shard: whoever stops it decides whether the
// shard is replaced (rotation), emptied (removal) or kept (shutdown).
func (w *clusterWatcher) stop() {
	w.cancel()
	<-w.done
}

// enable lets the watcher write its shard: it publishes everything once synced. It may
// be called more than once, and before or after the sync.
func (w *clusterWatcher) enable() { w.enableOne.Do(func() { close(w.enableCh) }) }

// run is the watcher's body: informers, the first sync (marking timeout when it takes
// longer than SyncTimeout, but going on waiting), then once enabled one full publish and
// the queue loop. It returns only after ctx ends, and only after the goroutines it
// started have returned.
func (w *clusterWatcher) run(ctx context.Context) {
	var bg sync.WaitGroup // probe, sync wait and queue shutdown; each ends with ctx
	defer bg.Wait()
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

	bg.Go(func() { w.probe(ctx) })
	syncTimer := time.NewTimer(w.cfg.SyncTimeout)
	defer syncTimer.Stop()
	syncDone := make(chan bool, 1) // buffered: the sender never waits for a run that returned
	bg.Go(func() {
		syncDone <- cache.WaitForCacheSync(ctx.Done(),
			infs[0].i.HasSynced, infs[1].i.HasSynced, infs[2].i.HasSynced, infs[3].i.HasSynced, infs[4].i.HasSynced)
	})
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
	bg.Go(func() {
		<-ctx.Done()
		w.queue.ShutDown() // ends processNext's Get
	})
	bg.Go(func() { // the selectors changed: recompute the pods they select
		_, changed := w.cfg.Entries.get()
		for changed != nil {
			select {
			case <-ctx.Done():
				return
			case <-changed:
				w.queue.Add(entriesKey)
				_, changed = w.cfg.Entries.get()
			}
		}
	})
	for w.processNext() {
	}
}

// getter returns a typed lookup by namespace and name in idx (namespace "" for
// cluster-scoped objects), returning T's zero value when absent.
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

// addHandlers turns informer events into queue keys. Events carry no data of their own
// into the registry: every key is recomputed from the caches (level-triggered), so a
// dropped or coalesced event costs nothing. What each kind of object requeues: a Service
// itself (and the gateways when it is or was a gateway), a slice its service, a pod the
// services selecting it, a node or namespace label change everything.
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
		if w.cfg.Entries.watches(p.Namespace) {
			w.queue.Add(entriesKey)
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

// labelsEqual reports whether two objects carry the same labels; objects without labels
// compare unequal, so that an unexpected type requeues rather than being missed.
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

// gatewaysOrNil returns d's gateways, or nil for a nil shard (not yet published).
func (d *ShardData) gatewaysOrNil() []Gateway {
	if d == nil {
		return nil
	}
	return d.Gateways
}

// handlerFuncs calls f for every add, update (with the new object) and delete.
func handlerFuncs(f func(any)) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{AddFunc: f, UpdateFunc: func(_, n any) { f(n) }, DeleteFunc: f}
}

// unwrap returns obj as T, looking inside the tombstone a delete may deliver instead.
func unwrap[T any](obj any) (T, bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	t, ok := obj.(T)
	return t, ok
}

// requeueAll queues every service, the gateways and the selected pods.
func (w *clusterWatcher) requeueAll() {
	for _, key := range w.services.ListKeys() {
		w.queue.Add(key)
	}
	w.queue.Add(gatewaysKey)
	w.queue.Add(entriesKey)
}

// processNext reconciles one key into the registry and reports whether the queue is
// still open. While the cluster's endpoints are withdrawn keys are dropped: the shard
// must stay empty, and publishAll rebuilds all of it when the link comes back.
func (w *clusterWatcher) processNext() bool {
	key, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(key)
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	if w.isWithdrawn() {
		w.queue.Forget(key) // publishAll runs when the link is back
		return true
	}
	switch key {
	case gatewaysKey:
		w.reg.UpdateGateways(w.shard, w.gateways())
	case entriesKey:
		w.reg.UpdateEndpoints(w.shard, w.entryEndpoints())
	default:
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

// entryEndpoints computes the endpoints the ServiceEntry workload selectors make of the
// cluster's pods, per host, with nil for each host the last computation had and this one
// lacks (UpdateEndpoints removes those), and records the hosts. Pods in cluster-local
// namespaces are never selected. It is called under writeMu.
func (w *clusterWatcher) entryEndpoints() map[mesh.Hostname][]mesh.Endpoint {
	sels, _ := w.cfg.Entries.get()
	tr := w.tr
	tr.defaultNetwork = w.defaultNetwork()
	out := tr.selectedEndpoints(sels, func(ns string) []*corev1.Pod {
		if w.cfg.LocalNamespaces[ns] {
			return nil
		}
		objs, _ := w.pods.ByIndex(cache.NamespaceIndex, ns)
		pods := make([]*corev1.Pod, 0, len(objs))
		for _, o := range objs {
			pods = append(pods, o.(*corev1.Pod))
		}
		return pods
	})
	next := map[mesh.Hostname]bool{}
	for h, eps := range out {
		if len(eps) == 0 {
			out[h] = nil
			continue
		}
		next[h] = true
	}
	for h := range w.entryHosts {
		if !next[h] {
			out[h] = nil
		}
	}
	w.entryHosts = next
	return out
}

// gateways returns the network gateways the cluster's Services describe (gatewaysOf).
func (w *clusterWatcher) gateways() []Gateway {
	var out []Gateway
	for _, o := range w.services.List() {
		out = append(out, gatewaysOf(w.id, o.(*corev1.Service))...)
	}
	return out
}

// isWithdrawn reports whether the link-health policy has emptied the shard.
func (w *clusterWatcher) isWithdrawn() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.withdrawn
}

// publishAll replaces the shard with everything in the caches, at once: readers see the
// cluster either as it was or as it is, never half rebuilt. It does nothing while the
// cluster's endpoints are withdrawn: the probe publishes when the link is back (a first
// sync that completes between two failed probes must not refill a withdrawn shard).
func (w *clusterWatcher) publishAll() {
	w.writeMu.Lock()
	defer w.writeMu.Unlock()
	if w.isWithdrawn() {
		return
	}
	data := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}, Gateways: w.gateways()}
	for _, key := range w.services.ListKeys() {
		host, svc, eps := w.translateKey(key)
		if svc != nil {
			data.Services[host] = svc
			data.Endpoints[host] = eps
		}
	}
	w.entryHosts = nil
	for host, eps := range w.entryEndpoints() {
		if eps != nil {
			data.Endpoints[host] = eps
		}
	}
	w.reg.ReplaceShard(w.shard, data)
}
