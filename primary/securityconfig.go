package primary

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/tools/cache"
)

// SecurityConfig is one immutable snapshot of the Istio security configuration read from
// the primary's config cluster: AuthorizationPolicies and PeerAuthentications, each sorted
// by creation time, then namespace and name (Istio's precedence between conflicting
// objects). Neither the slices nor the objects are modified after the snapshot is stored.
type SecurityConfig struct {
	// RootNamespace is the mesh's root namespace (the control plane's): a policy there
	// without a selector applies to the whole mesh.
	RootNamespace         string
	AuthorizationPolicies []*securityv1.AuthorizationPolicy
	PeerAuthentications   []*securityv1.PeerAuthentication
}

// SetSecurityConfig replaces the security configuration the next View carries. nil means
// "not known yet", and then no workload is given an inbound listener (an xDS-enabled
// server without one does not serve: the safe answer while policy is unknown); an empty
// SecurityConfig means "no policy".
func (r *Registry) SetSecurityConfig(c *SecurityConfig) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.security = c
	r.version++
	r.securityGen = r.version
	r.notifyLocked()
}

// The security.istio.io group version and resources the security watcher reads.
const (
	istioSecurityGV  = "security.istio.io/v1"
	resAuthzPolicies = "authorizationpolicies"
	resPeerAuthns    = "peerauthentications"
)

// securityConfigWatcher reads AuthorizationPolicies and PeerAuthentications from the
// config cluster with Istio's own informers and stores every change in the registry as a
// new SecurityConfig. Until the CRDs exist it stores an empty configuration (no policy),
// and polls for them.
type securityConfigWatcher struct {
	client    istioclient.Interface
	discovery discovery.DiscoveryInterface
	reg       *Registry
	root      string        // the mesh root namespace
	poll      time.Duration // how often to look for the CRDs until they exist
	log       *slog.Logger
}

// crdsInstalled reports whether the API server serves both kinds; any discovery error
// means "not yet".
func (w *securityConfigWatcher) crdsInstalled() bool {
	have := servedResources(w.discovery, istioSecurityGV)
	return have[resAuthzPolicies] && have[resPeerAuthns]
}

// run waits for the CRDs, then watches until ctx ends; it returns nil when ctx ends.
func (w *securityConfigWatcher) run(ctx context.Context) error {
	t := time.NewTicker(w.poll)
	defer t.Stop()
	logged := false
	for !w.crdsInstalled() {
		if !logged {
			// Without the CRDs there can be no policy: serve inbound listeners without.
			w.reg.SetSecurityConfig(&SecurityConfig{RootNamespace: w.root})
			w.log.Info("security config: AuthorizationPolicy/PeerAuthentication CRDs not installed; no policy until they are", "groupVersion", istioSecurityGV)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	factory := istioinformers.NewSharedInformerFactory(w.client, 0)
	apInf := factory.Security().V1().AuthorizationPolicies()
	paInf := factory.Security().V1().PeerAuthentications()
	changed, h := coalescingHandler()
	if _, err := apInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: security config: %w", err)
	}
	if _, err := paInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: security config: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), apInf.Informer().HasSynced, paInf.Informer().HasSynced) {
		return nil // ctx ended
	}
	w.log.Info("security config: watching AuthorizationPolicies and PeerAuthentications")
	for {
		aps, err1 := apInf.Lister().List(labels.Everything())
		pas, err2 := paInf.Lister().List(labels.Everything())
		if err := cmp.Or(err1, err2); err != nil {
			w.log.Error("security config: listing", "err", err)
		} else {
			w.reg.SetSecurityConfig(newSecurityConfig(w.root, aps, pas))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// newSecurityConfig sorts the objects into precedence order (see SecurityConfig).
func newSecurityConfig(root string, aps []*securityv1.AuthorizationPolicy, pas []*securityv1.PeerAuthentication) *SecurityConfig {
	c := &SecurityConfig{RootNamespace: root, AuthorizationPolicies: slices.Clone(aps), PeerAuthentications: slices.Clone(pas)}
	slices.SortFunc(c.AuthorizationPolicies, func(a, b *securityv1.AuthorizationPolicy) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
	slices.SortFunc(c.PeerAuthentications, func(a, b *securityv1.PeerAuthentication) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
	return c
}

// byPrecedence orders objects by creation time, then namespace and name.
func byPrecedence(a, b *metav1.ObjectMeta) int {
	return cmp.Or(a.CreationTimestamp.Compare(b.CreationTimestamp.Time), cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}
