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

// exportSet is a parsed exportTo: every namespace, or the listed ones (sorted; empty for
// ServiceEntry's "~", no namespace).
type exportSet struct {
	all bool
	ns  []string
}

// everywhere is the exportTo of an object that names none (Istio's default "*").
var everywhere = exportSet{all: true}

// admits reports whether proxies of namespace ns see the object.
func (e exportSet) admits(ns string) bool {
	if e.all {
		return true
	}
	_, ok := slices.BinarySearch(e.ns, ns)
	return ok
}

// parseExportTo validates an exportTo written in namespace own with Istio's rules: "."
// (own), "*" (every namespace, alone), namespace names (DNS labels), no duplicates ("."
// and own's name are one), and for ServiceEntries "~" (no namespace, alone).
func parseExportTo(own string, list []string, entry bool) (exportSet, *configError) {
	if len(list) == 0 {
		return everywhere, nil
	}
	var out exportSet
	for i, e := range list {
		field := func() string { return fmt.Sprintf("exportTo[%d] %q", i, e) }
		name := e
		switch e {
		case "*":
			if len(list) > 1 {
				return exportSet{}, rejectConfig(ReasonInvalid, "%s: * cannot be combined with other entries", field())
			}
			return everywhere, nil
		case "~":
			if !entry {
				return exportSet{}, rejectConfig(ReasonInvalid, "%s: ~ is only allowed on a ServiceEntry", field())
			}
			if len(list) > 1 {
				return exportSet{}, rejectConfig(ReasonInvalid, "%s: ~ (no namespace) cannot be combined with other entries", field())
			}
			return exportSet{}, nil
		case ".":
			name = own
		default:
			if errs := validation.IsDNS1123Label(e); len(errs) > 0 {
				return exportSet{}, rejectConfig(ReasonInvalid, "%s: not a namespace name: %s", field(), strings.Join(errs, "; "))
			}
		}
		if slices.Contains(out.ns, name) {
			return exportSet{}, rejectConfig(ReasonInvalid, "%s: duplicate entry (namespace %s)", field(), name)
		}
		out.ns = append(out.ns, name)
	}
	slices.Sort(out.ns)
	return out, nil
}

// entryExport is the exportTo of the ServiceEntry that defines a host.
type entryExport struct {
	id  string // objectID of the entry
	set exportSet
}

// objectID names a restricted object in a visibility signature.
func objectID(kind, ns, name string) string { return kind + ":" + ns + "/" + name }

// trafficPlans are the traffic plans of one registry view, one per visibility signature
// (docs/traffic.md, "exportTo"). Namespaces absent from sigOf have the empty signature
// and use public, which sees only the objects exported to every namespace.
type trafficPlans struct {
	public *trafficPlan
	bySig  map[string]*trafficPlan
	sigOf  map[string]string // namespace → non-empty signature
	shared *planShared
}

// forNamespace returns the plan of a proxy in namespace ns and its signature.
func (s *trafficPlans) forNamespace(ns string) (*trafficPlan, string) {
	sig := s.sigOf[ns]
	if sig == "" {
		return s.public, ""
	}
	return s.bySig[sig], sig
}

// planScope is what one plan sees: the restricted objects exported to its namespaces,
// the namespace whose own DestinationRules come first (set only when that namespace is
// part of the signature), and the ServiceEntry hosts it does not see.
type planScope struct {
	sig    string
	seen   map[string]bool
	own    string
	hidden map[mesh.Hostname]bool
	// shared is shared by every plan of one registry view.
	shared *planShared
}

// vsMemo remembers, per registry view, each VirtualService's successful translation and
// what it depended on, so that plans that give its destinations the same
// DestinationRules and see its hosts reuse it instead of translating it again.
type vsMemo map[*networkingv1.VirtualService]*vsTranslation

// vsTranslation is one successful planVirtualService result and its inputs: the hosts it
// looked up (its own and its destinations') and the DestinationRule key of each
// destination.
type vsTranslation struct {
	routes map[mesh.Hostname]map[uint16][]*route.Route
	keys   string
	warn   []string
	drKeys map[mesh.Hostname]string
}

// plan returns planVirtualService's result for vs under hosts, reusing a translation
// made for another plan when every host it used is visible here and every destination
// has the same DestinationRule. Refusals are not remembered (they are rare and may
// depend on what the plan hides).
func (m vsMemo) plan(v *View, domain string, vs *networkingv1.VirtualService, hosts map[mesh.Hostname]*hostPlan, hidden map[mesh.Hostname]bool) (map[mesh.Hostname]map[uint16][]*route.Route, string, []string, *configError) {
	if t := m[vs]; t != nil {
		ok := true
		for h := range t.routes {
			ok = ok && !hidden[h]
		}
		for h, k := range t.drKeys {
			ok = ok && !hidden[h] && hosts[h].drKeyOrEmpty() == k
		}
		if ok {
			return t.routes, t.keys, t.warn, nil
		}
	}
	routes, keys, warn, err := planVirtualService(v, domain, vs, hosts)
	if err != nil || m == nil {
		return routes, keys, warn, err
	}
	t := &vsTranslation{routes: routes, keys: keys, warn: warn, drKeys: map[mesh.Hostname]string{}}
	for _, k := range strings.Split(keys, ",") {
		// Each key is "<destination host>=<ports><its DestinationRule key>"
		// (destinationCluster); hostnames never contain "=".
		if h, _, found := strings.Cut(k, "="); found {
			t.drKeys[mesh.Hostname(h)] = hosts[mesh.Hostname(h)].drKeyOrEmpty()
		}
	}
	m[vs] = t
	return routes, keys, warn, nil
}

// sees reports whether the scope sees an object with the given id and exportTo.
func (sc *planScope) sees(id string, e exportSet) bool { return e.all || sc.seen[id] }

// objExport is an object's id and parsed exportTo (err when it is invalid).
type objExport struct {
	id  string
	set exportSet
	err *configError
}

// planShared is what every plan of one registry view shares: each DestinationRule's
// validation, each object's exportTo, and the VirtualService translations.
type planShared struct {
	drs    map[*networkingv1.DestinationRule]drResult
	drExp  map[*networkingv1.DestinationRule]objExport
	vsExp  map[*networkingv1.VirtualService]objExport
	vsMemo vsMemo
}

// newPlanShared parses what every plan of v needs once.
func newPlanShared(v *View) *planShared {
	sh := &planShared{drs: planDestinationRules(v), drExp: map[*networkingv1.DestinationRule]objExport{},
		vsExp: map[*networkingv1.VirtualService]objExport{}, vsMemo: vsMemo{}}
	if v.Traffic == nil {
		return sh
	}
	for _, dr := range v.Traffic.DestinationRules {
		e, err := parseExportTo(dr.Namespace, dr.Spec.GetExportTo(), false)
		sh.drExp[dr] = objExport{objectID(KindDestinationRule, dr.Namespace, dr.Name), e, err}
	}
	for _, vs := range v.Traffic.VirtualServices {
		e, err := parseExportTo(vs.Namespace, vs.Spec.GetExportTo(), false)
		sh.vsExp[vs] = objExport{objectID(KindVirtualService, vs.Namespace, vs.Name), e, err}
	}
	return sh
}

// visible returns the object's exportTo, everywhere when invalid (the object is refused
// in every plan, so it restricts nothing).
func (o objExport) visible() exportSet {
	if o.err != nil {
		return everywhere
	}
	return o.set
}

// planTrafficSet plans v's traffic configuration once per visibility signature. The
// signature of a namespace is the sorted ids of the restricted objects (exportTo not
// "*") exported to it, plus "own:<ns>" when it owns a DestinationRule for a host of
// another namespace (which it then sees first). Only namespaces the configuration names
// can have a non-empty signature, so the plans are few and known up front; with no
// restricted object there is exactly one.
func planTrafficSet(v *View) *trafficPlans {
	tc := v.Traffic
	root := defaultRootNamespace
	if v.Security != nil && v.Security.RootNamespace != "" {
		root = v.Security.RootNamespace
	}
	ids := map[string][]string{} // namespace → ids it sees
	restrict := func(id string, e exportSet) {
		if e.all {
			return
		}
		for _, ns := range e.ns {
			ids[ns] = append(ids[ns], id)
		}
	}
	var entries map[mesh.Hostname]entryExport
	sh := newPlanShared(v) // visibility-independent, shared by every plan
	if tc != nil {
		for _, vs := range tc.VirtualServices {
			if !gatewayOnly(vs) {
				restrict(sh.vsExp[vs].id, sh.vsExp[vs].visible())
			}
		}
		for _, dr := range tc.DestinationRules {
			e := sh.drExp[dr].visible()
			restrict(sh.drExp[dr].id, e)
			if h, err := resolveHost(dr.Spec.GetHost(), dr.Namespace, tc.Domain); err == nil && e.admits(dr.Namespace) {
				if svc := v.Service(h); svc != nil && svc.Key.Namespace != dr.Namespace {
					ids[dr.Namespace] = append(ids[dr.Namespace], "own:"+dr.Namespace)
				}
			}
		}
		entries = tc.entryExports
		for _, h := range slices.Sorted(maps.Keys(entries)) {
			restrict(entries[h].id, entries[h].set)
		}
	}
	s := &trafficPlans{bySig: map[string]*trafficPlan{}, sigOf: map[string]string{}, shared: sh}
	scopeFor := func(sig string, seen map[string]bool, own string) *planScope {
		sc := &planScope{sig: sig, seen: seen, own: own, shared: sh}
		for h, e := range entries {
			if !sc.sees(e.id, e.set) {
				if sc.hidden == nil {
					sc.hidden = map[mesh.Hostname]bool{}
				}
				sc.hidden[h] = true
			}
		}
		return sc
	}
	s.public = planTraffic1(v, scopeFor("", nil, ""), root)
	s.bySig[""] = s.public
	for _, ns := range slices.Sorted(maps.Keys(ids)) {
		list := slices.Compact(slices.Sorted(slices.Values(ids[ns])))
		sig := strings.Join(list, ",")
		s.sigOf[ns] = sig
		if s.bySig[sig] != nil {
			continue
		}
		seen := map[string]bool{}
		own := ""
		for _, id := range list {
			seen[id] = true
			if strings.HasPrefix(id, "own:") {
				own = ns
			}
		}
		s.bySig[sig] = planTraffic1(v, scopeFor(sig, seen, own), root)
	}
	s.public.status = s.aggregateStatus(v)
	return s
}

// aggregateStatus is every object's status as its home plan has it (the plan of its own
// namespace when exported there, else of the first namespace it names), in precedence
// order, with a warning naming the namespaces whose plan decided otherwise.
func (s *trafficPlans) aggregateStatus(v *View) []ConfigStatus {
	pub := s.public
	if len(s.bySig) == 1 {
		return pub.status
	}
	nsOf := map[string][]string{} // signature → its namespaces ("" is every other)
	for ns, sig := range s.sigOf {
		nsOf[sig] = append(nsOf[sig], ns)
	}
	type objKey struct{ kind, ns, name string }
	byPlan := map[string]map[objKey]ConfigStatus{}
	for sig, p := range s.bySig {
		m := map[objKey]ConfigStatus{}
		for _, st := range slices.Concat(p.parts.drs, p.parts.vss) {
			m[objKey{st.Kind, st.Namespace, st.Name}] = st
		}
		byPlan[sig] = m
	}
	describe := func(sig string) string {
		if sig == "" {
			return "every other namespace"
		}
		list := slices.Sorted(slices.Values(nsOf[sig]))
		return "namespace " + strings.Join(list, ", ")
	}
	home := func(kind, ns string, e exportSet) string {
		if e.admits(ns) || len(e.ns) == 0 {
			return s.sigOf[ns]
		}
		return s.sigOf[e.ns[0]]
	}
	var drs, vss []ConfigStatus
	add := func(out *[]ConfigStatus, kind, ns, name string, e exportSet) {
		k := objKey{kind, ns, name}
		hs := home(kind, ns, e)
		st, ok := byPlan[hs][k]
		if !ok {
			return
		}
		st.Warnings = slices.Clone(st.Warnings)
		for _, sig := range slices.Sorted(maps.Keys(byPlan)) {
			o, ok := byPlan[sig][k]
			if !ok || sig == hs || (o.Applied == st.Applied && o.Reason == st.Reason) {
				continue
			}
			if o.Applied {
				st.Warnings = append(st.Warnings, fmt.Sprintf("applied for proxies in %s", describe(sig)))
			} else {
				st.Warnings = append(st.Warnings, fmt.Sprintf("not applied for proxies in %s: %s: %s", describe(sig), o.Reason, o.Message))
			}
		}
		*out = append(*out, st)
	}
	tc := v.Traffic
	for _, dr := range tc.DestinationRules {
		add(&drs, KindDestinationRule, dr.Namespace, dr.Name, s.shared.drExp[dr].visible())
	}
	for _, vs := range tc.VirtualServices {
		if !gatewayOnly(vs) {
			add(&vss, KindVirtualService, vs.Namespace, vs.Name, s.shared.vsExp[vs].visible())
		}
	}
	return slices.Concat(pub.parts.entries, drs, pub.parts.ingress, vss, pub.parts.sidecars)
}

// drResult is one DestinationRule validated against the whole view.
type drResult struct {
	host    mesh.Hostname
	base    subsetPlan
	subsets []subsetPlan
	warn    []string
	err     *configError
}

// planDestinationRules validates every DestinationRule once per registry view: nothing
// in a rule's own validation depends on which namespace looks at it.
func planDestinationRules(v *View) map[*networkingv1.DestinationRule]drResult {
	out := map[*networkingv1.DestinationRule]drResult{}
	if v.Traffic == nil {
		return out
	}
	for _, dr := range v.Traffic.DestinationRules {
		var r drResult
		r.host, r.base, r.subsets, r.warn, r.err = planDestinationRule(v, v.Traffic.Domain, dr)
		out[dr] = r
	}
	return out
}
