package primary

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// KindSidecar is the Sidecar kind in ConfigStatus and the rejection metric.
const KindSidecar = "Sidecar"

// resSidecars is the Sidecar resource of networking.istio.io/v1.
const resSidecars = "sidecars"

// defaultRootNamespace is the mesh's root namespace when the view carries no security
// configuration to name it (SecurityConfig.RootNamespace is the primary's namespace).
const defaultRootNamespace = "istio-system"

// sidecarPlan is what the applied Sidecars scope: the root namespace's Sidecar without
// workloadSelector (the mesh default), one per namespace, and the Sidecars with
// workloadSelector of each namespace. Nil scopes nothing.
type sidecarPlan struct {
	root *sidecarScope
	byNS map[string]*sidecarScope
	// selectors are each namespace's applied Sidecars with workloadSelector, oldest
	// first (byPrecedence), which is the order they are tried in for a pod.
	selectors map[string][]*selectorSidecar
}

// selectorSidecar is one applied Sidecar with workloadSelector.
type selectorSidecar struct {
	name   string
	labels map[string]string
	// scope is nil when the Sidecar has no egress hosts: its pods inherit (the
	// namespace's Sidecar, else the mesh default).
	scope *sidecarScope
}

// selects reports whether a pod with labels podLabels carries every selector label.
func (s *selectorSidecar) selects(podLabels map[string]string) bool {
	for k, v := range s.labels {
		if pv, ok := podLabels[k]; !ok || pv != v {
			return false
		}
	}
	return true
}

// anySelectors reports whether any namespace has an applied Sidecar with
// workloadSelector; without one no view key has a Workload part.
func (p *sidecarPlan) anySelectors() bool {
	return p != nil && len(p.selectors) > 0
}

// hasSelectors reports whether namespace ns has an applied Sidecar with workloadSelector;
// only then does a proxy's view key depend on its pod's labels.
func (p *sidecarPlan) hasSelectors(ns string) bool {
	return p != nil && ns != "" && len(p.selectors[ns]) > 0
}

// workloadFor returns the name of the Sidecar with workloadSelector that applies to a pod
// of namespace ns with labels podLabels: the oldest that selects it (Istio leaves two
// undefined; its code takes the first in this order). "" when none does.
func (p *sidecarPlan) workloadFor(ns string, podLabels map[string]string) string {
	if !p.hasSelectors(ns) {
		return ""
	}
	for _, s := range p.selectors[ns] {
		if s.selects(podLabels) {
			return s.name
		}
	}
	return ""
}

// scopeForKey returns the scope of a proxy in namespace ns that the Sidecar with
// workloadSelector named workload applies to ("" for none): that Sidecar's, else (no
// egress, or a Sidecar since deleted) the namespace's, else the mesh default.
func (p *sidecarPlan) scopeForKey(ns, workload string) *sidecarScope {
	if p == nil {
		return nil
	}
	if workload != "" && ns != "" {
		for _, s := range p.selectors[ns] {
			if s.name == workload && s.scope != nil {
				return s.scope
			}
		}
	}
	return p.scopeFor(ns)
}

// sidecarScope is one applied Sidecar's egress hosts (the union over its egress
// listeners).
type sidecarScope struct {
	hosts []egressHost
}

// egressHost is one "namespace/dnsName" entry of egress[].hosts.
type egressHost struct {
	// ns is "*" (any namespace), "." (the proxy's namespace), "~" (none) or a name.
	ns string
	// dns is "*" (every name), "*.<suffix>" (names ending in .<suffix>) or a hostname.
	dns string
}

// scopeFor returns the scope of a proxy in namespace ns: its namespace's Sidecar, else
// the mesh default, else nil (the proxy sees every service).
func (p *sidecarPlan) scopeFor(ns string) *sidecarScope {
	if p == nil {
		return nil
	}
	if s := p.byNS[ns]; s != nil && ns != "" {
		return s
	}
	return p.root
}

// matches reports whether the entry admits a service of namespace svcNS named host, for
// a proxy in namespace proxyNS ("." is the proxy's namespace, which for a namespace's
// own Sidecar is the Sidecar's namespace and for the mesh default each proxy's own).
func (h egressHost) matches(host mesh.Hostname, svcNS, proxyNS string) bool {
	switch h.ns {
	case "~":
		return false
	case "*":
	case ".":
		if svcNS != proxyNS || proxyNS == "" {
			return false
		}
	default:
		if svcNS != h.ns {
			return false
		}
	}
	switch {
	case h.dns == "*":
		return true
	case strings.HasPrefix(h.dns, "*."):
		return strings.HasSuffix(string(host), h.dns[1:])
	default:
		return string(host) == h.dns
	}
}

// admitted returns the hostnames of v a proxy in namespace proxyNS receives under s:
// the services an egress host matches, plus every host their routes send traffic to (as
// Istio adds a VirtualService's destinations to the scope), so that no admitted route
// names a cluster the proxy does not have.
func (s *sidecarScope) admitted(v *View, plan *trafficPlan, proxyNS string) map[mesh.Hostname]bool {
	in := map[mesh.Hostname]bool{}
	for _, svc := range v.Services {
		for _, h := range s.hosts {
			if h.matches(svc.Hostname, svc.Key.Namespace, proxyNS) {
				in[svc.Hostname] = true
				break
			}
		}
	}
	var dests []mesh.Hostname
	for h := range in {
		hp := plan.hosts[h]
		if hp == nil {
			continue
		}
		for _, rs := range hp.routes {
			for _, r := range rs {
				dests = append(dests, routeDestinations(r)...)
			}
		}
	}
	for _, d := range dests {
		in[d] = true
	}
	return in
}

// routeDestinations returns the hosts of the clusters a route sends to (its cluster or
// weighted clusters, and its mirror).
func routeDestinations(r *route.Route) []mesh.Hostname {
	a := r.GetRoute()
	if a == nil {
		return nil
	}
	var names []string
	if c := a.GetCluster(); c != "" {
		names = append(names, c)
	}
	for _, w := range a.GetWeightedClusters().GetClusters() {
		names = append(names, w.GetName())
	}
	for _, m := range a.GetRequestMirrorPolicies() {
		names = append(names, m.GetCluster())
	}
	var out []mesh.Hostname
	for _, n := range names {
		if o, err := mesh.ParseClusterName(n); err == nil {
			out = append(out, o.Host)
		}
	}
	return out
}

// planSidecars validates the Sidecars (in precedence order) into a plan. It is pure. Each
// Sidecar is applied whole or refused whole with a reason; of two Sidecars without
// workloadSelector in one namespace the older applies and the newer is refused
// (conflict), since Istio leaves that case undefined. A namespace Sidecar without egress
// inherits the mesh default, as in Istio. Sidecars with workloadSelector never conflict
// with the namespace's own: they take precedence for the pods they select; a newer one
// that could select some pod an older one does (no selector label with two values) is
// applied with a warning, as the older applies to the pods both select.
func planSidecars(root string, scs []*networkingv1.Sidecar) (*sidecarPlan, []ConfigStatus) {
	if len(scs) == 0 {
		return nil, nil
	}
	p := &sidecarPlan{byNS: map[string]*sidecarScope{}}
	owner := map[string]string{}
	var status []ConfigStatus
	for _, sc := range scs {
		st := ConfigStatus{Kind: KindSidecar, Namespace: sc.Namespace, Name: sc.Name, ResourceVersion: sc.ResourceVersion, UID: string(sc.UID)}
		scope, warn, err := planSidecar(sc)
		if sel := sc.Spec.GetWorkloadSelector(); err == nil && sel != nil {
			ss := &selectorSidecar{name: sc.Name, labels: sel.GetLabels()}
			if len(scope.hosts) > 0 {
				ss.scope = scope
			}
			for _, older := range p.selectors[sc.Namespace] {
				if selectorsOverlap(older.labels, ss.labels) {
					warn = append(warn, fmt.Sprintf("may select the same pods as Sidecar %s/%s, which is older and applies to the pods both select", sc.Namespace, older.name))
				}
			}
			if p.selectors == nil {
				p.selectors = map[string][]*selectorSidecar{}
			}
			p.selectors[sc.Namespace] = append(p.selectors[sc.Namespace], ss)
			st.Applied, st.Warnings = true, warn
			for _, h := range scope.hosts {
				st.Hosts = append(st.Hosts, h.ns+"/"+h.dns)
			}
			status = append(status, st)
			continue
		}
		if err == nil && owner[sc.Namespace] != "" {
			err = rejectConfig(ReasonConflict, "another Sidecar without workloadSelector, %s, already applies to namespace %s (the oldest wins)", owner[sc.Namespace], sc.Namespace)
		}
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
			status = append(status, st)
			continue
		}
		owner[sc.Namespace] = sc.Name
		st.Applied, st.Warnings = true, warn
		for _, h := range scope.hosts {
			st.Hosts = append(st.Hosts, h.ns+"/"+h.dns)
		}
		if len(scope.hosts) > 0 { // without egress hosts it inherits (the default: everything)
			p.byNS[sc.Namespace] = scope
			if sc.Namespace == root {
				p.root = scope
			}
		}
		status = append(status, st)
	}
	return p, status
}

// planSidecar validates one Sidecar. Only egress hosts are translated; a field that would
// change which ports or addresses a proxy uses (egress port, bind, captureMode) refuses
// the object, since applying its hosts to every port would mean something else; fields
// about inbound traffic or unknown destinations are accepted with a warning.
func planSidecar(sc *networkingv1.Sidecar) (*sidecarScope, []string, *configError) {
	spec := &sc.Spec
	var warn []string
	if sel := spec.GetWorkloadSelector(); sel != nil {
		if len(sel.GetLabels()) == 0 {
			return nil, nil, rejectConfig(ReasonInvalid, "workloadSelector.labels is required (drop workloadSelector to scope the whole namespace)")
		}
		for _, k := range slices.Sorted(maps.Keys(sel.GetLabels())) {
			if errs := validation.IsQualifiedName(k); len(errs) > 0 {
				return nil, nil, rejectConfig(ReasonInvalid, "workloadSelector.labels key %q: %s", k, strings.Join(errs, "; "))
			}
			if errs := validation.IsValidLabelValue(sel.GetLabels()[k]); len(errs) > 0 {
				return nil, nil, rejectConfig(ReasonInvalid, "workloadSelector.labels[%s] %q: %s", k, sel.GetLabels()[k], strings.Join(errs, "; "))
			}
		}
	}
	if len(spec.GetIngress()) > 0 {
		warn = append(warn, "ingress is not acted on: inbound listeners are built as without it")
	}
	if spec.GetOutboundTrafficPolicy() != nil {
		warn = append(warn, "outboundTrafficPolicy is not acted on: proxies only ever reach registry services")
	}
	if spec.GetInboundConnectionPool() != nil {
		warn = append(warn, "inboundConnectionPool is not acted on")
	}
	s := &sidecarScope{}
	for i, e := range spec.GetEgress() {
		field := fmt.Sprintf("egress[%d]", i)
		switch {
		case e.GetPort() != nil:
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.port: per-port egress listeners are not supported yet (omit port to scope every port)", field)
		case e.GetBind() != "":
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.bind is not supported", field)
		case e.GetCaptureMode() != 0:
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.captureMode is not supported", field)
		case len(e.GetHosts()) == 0:
			return nil, nil, rejectConfig(ReasonInvalid, "%s.hosts is required", field)
		}
		for j, raw := range e.GetHosts() {
			h, err := parseEgressHost(raw)
			if err != nil {
				return nil, nil, rejectConfig(ReasonInvalid, "%s.hosts[%d] %q: %v", field, j, raw, err)
			}
			s.hosts = append(s.hosts, h)
		}
	}
	return s, warn, nil
}

// selectorsOverlap reports whether some pod could carry the labels of both selectors:
// no label has two different values in them.
func selectorsOverlap(a, b map[string]string) bool {
	for k, v := range a {
		if w, ok := b[k]; ok && w != v {
			return false
		}
	}
	return true
}

// parseEgressHost parses "namespace/dnsName": namespace "*", ".", "~" or a namespace
// name; dnsName "*", "*.<suffix>" or a fully qualified hostname.
func parseEgressHost(s string) (egressHost, error) {
	ns, dns, ok := strings.Cut(s, "/")
	if !ok {
		return egressHost{}, fmt.Errorf("want namespace/dnsName (for example ./* or istio-system/*)")
	}
	switch ns {
	case "*", ".", "~":
	default:
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return egressHost{}, fmt.Errorf("namespace: %s", strings.Join(errs, "; "))
		}
	}
	switch {
	case dns == "*":
	case strings.HasPrefix(dns, "*."):
		if _, err := mesh.ParseHostname(dns[2:]); err != nil {
			return egressHost{}, fmt.Errorf("dnsName: %w", err)
		}
	default:
		if strings.Contains(dns, "*") {
			return egressHost{}, fmt.Errorf("dnsName: a wildcard is only allowed as the first label (*.example.com)")
		}
		if _, err := mesh.ParseHostname(dns); err != nil {
			return egressHost{}, fmt.Errorf("dnsName: %w", err)
		}
	}
	return egressHost{ns: ns, dns: dns}, nil
}
