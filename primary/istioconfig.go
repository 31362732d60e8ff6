package primary

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"sync"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// TrafficConfig is one immutable snapshot of the Istio traffic configuration read from the
// primary's config cluster. Objects are sorted by creation time, then namespace and name,
// which is the precedence Istio gives conflicting objects. Neither the slices nor the
// objects are modified after the snapshot is stored.
type TrafficConfig struct {
	// Domain resolves short host names ("reviews" in namespace "demo" is
	// reviews.demo.svc.<Domain>).
	Domain           string
	VirtualServices  []*networkingv1.VirtualService
	DestinationRules []*networkingv1.DestinationRule
	// ServiceEntries is what became of each ServiceEntry (serviceentry.go); the applied
	// ones are the registry's SourceServiceEntry shard.
	ServiceEntries []ConfigStatus
	// Sidecars scope which services each namespace's proxies receive (sidecarscope.go).
	Sidecars []*networkingv1.Sidecar
	// entryExports is the exportTo of the applied ServiceEntry of each of its hosts
	// (absent: exported everywhere; exportto.go).
	entryExports map[mesh.Hostname]entryExport
}

// SetTrafficConfig replaces the traffic configuration the next View carries; nil removes
// it. Every service may route differently afterwards, so the builder re-plans them all
// (it rebuilds only services whose plan changed).
func (r *Registry) SetTrafficConfig(c *TrafficConfig) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.traffic = c
	r.version++
	r.trafficGen = r.version
	r.notifyLocked()
}

// The networking.istio.io group version and resources the config watcher needs.
const (
	istioNetworkingGV  = "networking.istio.io/v1"
	resVirtualServices = "virtualservices"
	resDestRules       = "destinationrules"
	resServiceEntries  = "serviceentries"
)

// istioConfigWatcher reads VirtualServices and DestinationRules from the config cluster
// with Istio's own informers and stores every change in the registry as a new
// TrafficConfig.
type istioConfigWatcher struct {
	client    istioclient.Interface
	discovery discovery.DiscoveryInterface
	reg       *Registry
	cluster   mesh.ClusterID // the config cluster, which ServiceEntry endpoints belong to
	domain    string
	poll      time.Duration // how often to look for the CRDs until they exist
	log       *slog.Logger
	// absent is called once when the first look finds no CRDs: there is no configuration
	// to wait for, so the primary may report ready without it.
	absent func()
	// resolver looks up resolution-DNS ServiceEntries' names (nil: they get no
	// endpoints); entries receives the applied workloadSelectors (nil: none).
	resolver *entryResolver
	entries  *entrySelectors
}

// crdsInstalled reports whether the API server serves VirtualServices and
// DestinationRules, and whether it serves ServiceEntries and Sidecars (optional:
// watched once they exist; Istio installs all four together). A cluster without Istio's CRDs is normal (the primary then routes
// with its defaults), so any discovery error only means "not yet".
func (w *istioConfigWatcher) crdsInstalled() (routing, entries bool) {
	have := servedResources(w.discovery, istioNetworkingGV)
	return have[resVirtualServices] && have[resDestRules], have[resServiceEntries] && have[resSidecars]
}

// servedResources returns the resources the API server serves in group version gv, by
// name; empty on any discovery error, which the config watchers read as "not yet".
func servedResources(d discovery.DiscoveryInterface, gv string) map[string]bool {
	have := map[string]bool{}
	list, err := d.ServerResourcesForGroupVersion(gv)
	if err != nil || list == nil {
		return have
	}
	for _, r := range list.APIResources {
		have[r.Name] = true
	}
	return have
}

// run waits until the CRDs exist (polling discovery, so installing Istio's CRDs after the
// primary started works), then watches until ctx ends. It returns nil when ctx ends.
func (w *istioConfigWatcher) run(ctx context.Context) error {
	t := time.NewTicker(w.poll)
	defer t.Stop()
	logged := false
	routing, entries := w.crdsInstalled()
	for ; !routing; routing, entries = w.crdsInstalled() {
		if !logged {
			if w.absent != nil {
				w.absent()
			}
			w.log.Info("istio config: VirtualService/DestinationRule CRDs not installed; default routes until they are", "groupVersion", istioNetworkingGV)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	factory := istioinformers.NewSharedInformerFactory(w.client, 0)
	vsInf := factory.Networking().V1().VirtualServices()
	drInf := factory.Networking().V1().DestinationRules()
	changed, h := coalescingHandler()
	if _, err := vsInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: istio config: %w", err)
	}
	if _, err := drInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: istio config: %w", err)
	}
	seInf := factory.Networking().V1().ServiceEntries()
	// watchEntries starts the ServiceEntry informer on the running factory (Start starts
	// only informers not started yet), once its CRD exists.
	scInf := factory.Networking().V1().Sidecars()
	watchEntries := func() error {
		if _, err := seInf.Informer().AddEventHandler(h); err != nil {
			return fmt.Errorf("primary: istio config: %w", err)
		}
		if _, err := scInf.Informer().AddEventHandler(h); err != nil {
			return fmt.Errorf("primary: istio config: %w", err)
		}
		factory.Start(ctx.Done())
		cache.WaitForCacheSync(ctx.Done(), seInf.Informer().HasSynced, scInf.Informer().HasSynced)
		w.log.Info("istio config: watching ServiceEntries and Sidecars")
		return nil
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), vsInf.Informer().HasSynced, drInf.Informer().HasSynced) {
		return nil // ctx ended
	}
	w.log.Info("istio config: watching VirtualServices and DestinationRules")
	if entries {
		if err := watchEntries(); err != nil {
			return err
		}
	}
	var lastShard *ShardData
	var lookup entryLookup
	var resolved <-chan struct{}
	if w.resolver != nil {
		lookup, resolved = w.resolver.result, w.resolver.Changed()
		var rwg sync.WaitGroup
		defer rwg.Wait()
		rctx, cancel := context.WithCancel(ctx)
		defer cancel() // runs before rwg.Wait
		rwg.Go(func() { w.resolver.run(rctx) })
	}
	for {
		vss, err1 := vsInf.Lister().List(labels.Everything())
		drs, err2 := drInf.Lister().List(labels.Everything())
		var ses []*networkingv1.ServiceEntry
		var scs []*networkingv1.Sidecar
		var err3, err4 error
		if entries {
			ses, err3 = seInf.Lister().List(labels.Everything())
			scs, err4 = scInf.Lister().List(labels.Everything())
		}
		if err := cmp.Or(err1, err2, err3, err4); err != nil {
			w.log.Error("istio config: listing", "err", err)
		} else {
			tc := newTrafficConfig(w.domain, vss, drs)
			slices.SortFunc(ses, func(a, b *networkingv1.ServiceEntry) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
			ep := planServiceEntries(w.cluster, w.domain, ses, lookup)
			shard := ep.shard
			tc.ServiceEntries, tc.entryExports = ep.status, ep.exports
			if w.resolver != nil {
				w.resolver.setWanted(ep.names)
			}
			w.entries.set(ep.selectors)
			tc.Sidecars = slices.Clone(scs)
			slices.SortFunc(tc.Sidecars, func(a, b *networkingv1.Sidecar) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
			// The shard first, so the configuration that refers to its hosts finds them.
			if !reflect.DeepEqual(shard, lastShard) {
				w.reg.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: w.cluster}, shard)
				lastShard = shard
			}
			w.reg.SetTrafficConfig(tc)
		}
		var look <-chan time.Time // ServiceEntry CRD not installed yet: look again each poll
		if !entries {
			look = t.C
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-resolved:
		case <-look:
			if _, entries = w.crdsInstalled(); entries {
				if err := watchEntries(); err != nil {
					return err
				}
			}
		}
	}
}

// newTrafficConfig sorts the objects into precedence order (see TrafficConfig).
func newTrafficConfig(domain string, vss []*networkingv1.VirtualService, drs []*networkingv1.DestinationRule) *TrafficConfig {
	c := &TrafficConfig{Domain: domain, VirtualServices: slices.Clone(vss), DestinationRules: slices.Clone(drs)}
	slices.SortFunc(c.VirtualServices, func(a, b *networkingv1.VirtualService) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
	slices.SortFunc(c.DestinationRules, func(a, b *networkingv1.DestinationRule) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
	return c
}

// coalescingHandler returns an informer event handler that turns any number of adds,
// updates and deletes into at most one pending signal on changed: the config watchers
// rebuild from their listers, so only "something changed since the last build" matters.
func coalescingHandler() (changed chan struct{}, h cache.ResourceEventHandler) {
	changed = make(chan struct{}, 1)
	notify := func(any) {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	return changed, cache.ResourceEventHandlerFuncs{AddFunc: notify, UpdateFunc: func(_, n any) { notify(n) }, DeleteFunc: notify}
}
