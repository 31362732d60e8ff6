package primary

import (
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// entrySelector is an applied ServiceEntry's workloadSelector: the pods of Namespace
// whose labels include every one of Labels, in every cluster, are endpoints of Hosts,
// serving each entry port on its target port.
type entrySelector struct {
	Namespace string
	Name      string // the entry's, for logs
	Labels    map[string]string
	Hosts     []mesh.Hostname
	Ports     []mesh.Port // the entry's ports with their target numbers
	Internal  bool        // MESH_INTERNAL: pods labelled for Istio mTLS get it
}

// planEntrySelector validates a workloadSelector. Istio's rules: it selects pods in the
// entry's namespace and excludes static endpoints; it needs at least one label (an
// empty one would make every pod of the namespace an endpoint) and STATIC resolution.
func planEntrySelector(se *networkingv1.ServiceEntry, lbls map[string]string, dns, internal bool, ports []ServicePort, targets map[string]uint16) (*entrySelector, *configError) {
	if len(se.Spec.GetEndpoints()) > 0 {
		return nil, rejectConfig(ReasonInvalid, "workloadSelector and endpoints are mutually exclusive")
	}
	if dns {
		return nil, rejectConfig(ReasonInvalid, "workloadSelector needs resolution STATIC (the pods' addresses are the endpoints)")
	}
	if len(lbls) == 0 {
		return nil, rejectConfig(ReasonInvalid, "workloadSelector.labels: at least one label is required")
	}
	for _, k := range slices.Sorted(maps.Keys(lbls)) {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return nil, rejectConfig(ReasonInvalid, "workloadSelector.labels key %q: %s", k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(lbls[k]); len(errs) > 0 {
			return nil, rejectConfig(ReasonInvalid, "workloadSelector.labels[%s] %q: %s", k, lbls[k], strings.Join(errs, "; "))
		}
	}
	sel := &entrySelector{Namespace: se.Namespace, Name: se.Name, Labels: lbls, Internal: internal}
	for _, p := range ports {
		sel.Ports = append(sel.Ports, mesh.Port{Name: p.Name, Number: targets[p.Name], Protocol: p.Protocol})
	}
	return sel, nil
}

// matches reports whether a pod of namespace ns with labels lbls is selected.
func (s *entrySelector) matches(ns string, lbls map[string]string) bool {
	if ns != s.Namespace {
		return false
	}
	for k, v := range s.Labels {
		if got, ok := lbls[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// entrySelectors holds the applied workloadSelectors, written by the config watcher and
// read by every cluster watcher. It is safe for concurrent use; a nil one holds none.
type entrySelectors struct {
	mu      sync.Mutex
	list    []entrySelector
	changed chan struct{} // closed and replaced when list changes
}

func newEntrySelectors() *entrySelectors { return &entrySelectors{changed: make(chan struct{})} }

// set replaces the selectors; the watchers recompute their pods' endpoints when they
// differ from the last ones.
func (s *entrySelectors) set(list []entrySelector) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if reflect.DeepEqual(list, s.list) {
		return
	}
	s.list = list
	close(s.changed)
	s.changed = make(chan struct{})
}

// get returns the selectors (not to be modified) and a channel closed when they change.
func (s *entrySelectors) get() ([]entrySelector, <-chan struct{}) {
	if s == nil {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.list, s.changed
}

// watches reports whether some selector selects pods of namespace ns.
func (s *entrySelectors) watches(ns string) bool {
	list, _ := s.get()
	return slices.ContainsFunc(list, func(e entrySelector) bool { return e.Namespace == ns })
}

// selectedEndpoints returns, per entry host, the endpoints the selectors make of pods
// (from the watcher's cache, one namespace at a time). A pod is an endpoint once it has
// an address, as long as it has not finished; it is healthy when Ready, draining while
// it terminates. Identity, network, locality and labels come from the pod as for
// service endpoints (translator.endpoint); mTLS only for MESH_INTERNAL entries.
func (t *translator) selectedEndpoints(sels []entrySelector, podsIn func(ns string) []*corev1.Pod) map[mesh.Hostname][]mesh.Endpoint {
	out := map[mesh.Hostname][]mesh.Endpoint{}
	for _, sel := range sels {
		var eps []mesh.Endpoint
		for _, p := range podsIn(sel.Namespace) {
			if !sel.matches(p.Namespace, p.Labels) || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
				continue
			}
			addr, err := netip.ParseAddr(p.Status.PodIP)
			if err != nil {
				continue
			}
			ready, terminating := podReady(p), p.DeletionTimestamp != nil
			ref := discoveryv1.Endpoint{
				TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
				NodeName:   &p.Spec.NodeName,
				Conditions: discoveryv1.EndpointConditions{Ready: &ready, Terminating: &terminating},
			}
			pt := *t // the pod itself, not a cache lookup of it
			pt.pod = func(string, string) *corev1.Pod { return p }
			ep := pt.endpoint(addr.Unmap(), ref, slices.Clone(sel.Ports))
			ep.MTLSReady = ep.MTLSReady && sel.Internal
			eps = append(eps, ep)
		}
		slices.SortFunc(eps, func(a, b mesh.Endpoint) int { return a.Address.Compare(b.Address) })
		for _, h := range sel.Hosts {
			out[h] = eps
		}
	}
	return out
}

// podReady reports whether a pod's Ready condition is true.
func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
