package primary

import (
	"cmp"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
	apinet "istio.io/api/networking/v1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Kinds of Istio objects in ConfigStatus and the rejection metric.
const (
	KindVirtualService  = "VirtualService"
	KindDestinationRule = "DestinationRule"
)

// Reasons an object is refused: the "reason" label of isthmus_primary_config_rejected_total
// (a short fixed set, so the metric's cardinality stays bounded). The message in
// ConfigStatus says exactly what is wrong.
const (
	ReasonUnknownHost   = "unknown_host"
	ReasonUnknownSubset = "unknown_subset"
	ReasonUnknownPort   = "unknown_port"
	ReasonBadRegex      = "bad_regex"
	ReasonBadWeights    = "bad_weights"
	ReasonConflict      = "conflict"
	ReasonInvalid       = "invalid"
	ReasonUnsupported   = "unsupported"
)

// ConfigStatus is what the primary did with one Istio object (/debug/configz).
type ConfigStatus struct {
	Kind            string   `json:"kind"`
	Namespace       string   `json:"namespace"`
	Name            string   `json:"name"`
	ResourceVersion string   `json:"resourceVersion"`
	UID             string   `json:"uid,omitempty"`
	Applied         bool     `json:"applied"`
	Reason          string   `json:"reason,omitempty"`  // one of the Reason constants when refused
	Message         string   `json:"message,omitempty"` // what is wrong, naming the field
	Hosts           []string `json:"hosts,omitempty"`   // the resolved hosts it applies to
	// Warnings name fields that were accepted but are not acted on yet.
	Warnings []string `json:"warnings,omitempty"`
}

// trafficPlan is the validated, translated traffic configuration for one registry view:
// what each host's routes and subsets are, and what happened to every object.
type trafficPlan struct {
	hosts  map[mesh.Hostname]*hostPlan
	status []ConfigStatus // in precedence order: ServiceEntries, DestinationRules, ingress, VirtualServices, Sidecars
	// parts is status by kind; the public plan's status aggregates every plan's
	// (trafficPlans.aggregateStatus).
	parts statusParts
	// sidecars scope the proxies' views (sidecarscope.go); nil scopes nothing.
	sidecars *sidecarPlan
	// ingress is the Gateways and the gateways' VirtualServices (ingress.go); only in
	// the public plan.
	ingress *ingressPlan
	// hidden are the ServiceEntry hosts whose entry is not exported to this plan's
	// namespaces: absent from their proxies' views.
	hidden map[mesh.Hostname]bool
}

// statusParts are a plan's statuses by kind, each in precedence order.
type statusParts struct {
	entries, drs, ingress, vss, sidecars []ConfigStatus
}

// hostPlan is everything the traffic configuration changes about one host.
type hostPlan struct {
	// key changes whenever anything below does (the objects' resource versions and the
	// destinations' ports); the builder rebuilds the host's resources when it does.
	key     string
	drKey   string                    // the applied DestinationRule's part of key
	base    subsetPlan                // the host itself: the DestinationRule's policy per port
	subsets []subsetPlan              // from the DestinationRule, sorted by name
	routes  map[uint16][]*route.Route // by the host's port, from the VirtualService
}

// subsetPlan is one DestinationRule subset (or, unnamed, the host itself).
type subsetPlan struct {
	name   string
	labels map[string]string
	ports  map[uint16]clusterPolicy // the resolved traffic policy per port; absent is the default
}

// policy returns the subset's resolved policy for port.
func (s subsetPlan) policy(port uint16) clusterPolicy { return s.ports[port] }

// subset returns the plan of the named subset ("" is the host itself), or false.
func (hp *hostPlan) subset(name string) (subsetPlan, bool) {
	if hp == nil {
		return subsetPlan{}, name == ""
	}
	if name == "" {
		return hp.base, true
	}
	i := slices.IndexFunc(hp.subsets, func(s subsetPlan) bool { return s.name == name })
	if i < 0 {
		return subsetPlan{}, false
	}
	return hp.subsets[i], true
}

// lbChoice is a load-balancing policy per client kind: grpc-go has no random picker, so
// RANDOM is round robin for proxyless clients and random for Envoy.
type lbChoice struct{ grpc, envoy cluster.Cluster_LbPolicy }

// policy returns the cluster LB policy for a proxy kind.
func (l lbChoice) policy(kind ProxyKind) cluster.Cluster_LbPolicy {
	if kind == ProxySidecar {
		return l.envoy
	}
	return l.grpc
}

// configError is a refusal with its metric reason.
type configError struct{ reason, msg string }

func (e *configError) Error() string { return e.msg }

func rejectConfig(reason, format string, args ...any) *configError {
	return &configError{reason: reason, msg: fmt.Sprintf(format, args...)}
}

// resolveHost turns a host as written in an object of namespace ns into a hostname: a
// name without dots is short for <name>.<ns>.svc.<domain>, as in Istio; anything else is
// taken as a fully qualified name.
func resolveHost(h, ns, domain string) (mesh.Hostname, *configError) {
	if strings.Contains(h, "*") {
		return "", rejectConfig(ReasonUnsupported, "host %q: wildcard hosts are not supported yet", h)
	}
	if !strings.Contains(h, ".") {
		h = h + "." + ns + ".svc." + cmp.Or(domain, mesh.DefaultDomain)
	}
	host, err := mesh.ParseHostname(h)
	if err != nil {
		return "", rejectConfig(ReasonInvalid, "host %q: %v", h, err)
	}
	return host, nil
}

// planTraffic returns the plan of a proxy that sees only the objects exported to every
// namespace, with every object's status (planTrafficSet).
func planTraffic(v *View) *trafficPlan { return planTrafficSet(v).public }

// planTraffic1 validates and translates the part of v's traffic configuration scope
// sees. It is pure. Each object is applied whole or refused whole: a refused object
// changes nothing, and the others are planned as if it did not exist. DestinationRules
// come first, since VirtualServices refer to their subsets. ServiceEntry hosts the scope
// does not see are not services here. Only the public plan (empty signature) plans the
// ingress gateways' configuration.
func planTraffic1(v *View, scope *planScope, root string) *trafficPlan {
	p := &trafficPlan{hosts: map[mesh.Hostname]*hostPlan{}, hidden: scope.hidden}
	tc := v.Traffic
	if tc == nil {
		return p
	}
	if len(scope.hidden) > 0 {
		sv := *v
		sv.Services = slices.DeleteFunc(slices.Clone(v.Services), func(s *MergedService) bool { return scope.hidden[s.Hostname] })
		v = &sv
	}
	host := func(h mesh.Hostname) *hostPlan {
		hp := p.hosts[h]
		if hp == nil {
			hp = &hostPlan{}
			p.hosts[h] = hp
		}
		return hp
	}
	p.parts.entries = tc.ServiceEntries
	// DestinationRules: per host, the first rule of the best tier the scope sees — the
	// proxy's own namespace (scope.own), the host's namespace, the root namespace
	// (Istio's lookup); a later rule of that tier and namespace is a conflict, rules of
	// other namespaces do not apply to this plan's proxies.
	type drPick struct {
		dr   *networkingv1.DestinationRule
		tier int
	}
	tierOf := func(ns string, h mesh.Hostname) int {
		svc := v.Service(h)
		switch {
		case scope.own != "" && ns == scope.own:
			return 0
		case svc != nil && ns == svc.Key.Namespace:
			return 1
		case ns == root:
			return 2
		}
		return -1
	}
	sh := scope.shared
	best := map[mesh.Hostname]drPick{}
	for _, dr := range tc.DestinationRules {
		r, x := sh.drs[dr], sh.drExp[dr]
		if !scope.sees(x.id, x.visible()) || r.err != nil || scope.hidden[r.host] {
			continue
		}
		if t := tierOf(dr.Namespace, r.host); t >= 0 {
			if b, ok := best[r.host]; !ok || t < b.tier {
				best[r.host] = drPick{dr, t}
			}
		}
	}
	for _, dr := range tc.DestinationRules {
		x := sh.drExp[dr]
		if !scope.sees(x.id, x.visible()) {
			continue
		}
		st := ConfigStatus{Kind: KindDestinationRule, Namespace: dr.Namespace, Name: dr.Name, ResourceVersion: dr.ResourceVersion, UID: string(dr.UID)}
		r := sh.drs[dr]
		err := cmp.Or(x.err, r.err)
		if err == nil && scope.hidden[r.host] {
			err = rejectConfig(ReasonUnknownHost, "host %s: no such service in the mesh (its ServiceEntry is not exported here)", r.host)
		}
		if err == nil {
			b := best[r.host]
			switch t := tierOf(dr.Namespace, r.host); {
			case t < 0:
				continue // applies only to the proxies of its own namespace, not this plan's
			case b.dr == dr:
			case t == b.tier && dr.Namespace == b.dr.Namespace:
				err = rejectConfig(ReasonConflict, "host %s already has DestinationRule %s/%s", r.host, b.dr.Namespace, b.dr.Name)
			default: // a better tier's rule takes the host for these proxies
				st.Applied, st.Hosts, st.Warnings = true, []string{string(r.host)}, drWarnings(r, dr, v, root)
				p.parts.drs = append(p.parts.drs, st)
				continue
			}
		}
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
		} else {
			owner := dr.Namespace + "/" + dr.Name
			hp := host(r.host)
			hp.base, hp.subsets = r.base, r.subsets
			hp.drKey = "dr:" + owner + "@" + dr.ResourceVersion + ";"
			hp.key += hp.drKey
			st.Applied, st.Hosts, st.Warnings = true, []string{string(r.host)}, drWarnings(r, dr, v, root)
		}
		p.parts.drs = append(p.parts.drs, st)
	}
	if scope.sig == "" {
		p.ingress, p.parts.ingress = planIngress(v, tc, p.hosts) // ingress.go: Gateways, gateway-only VirtualServices
	}
	// VirtualServices: the restricted ones the scope sees first, then those exported
	// everywhere, each in creation order (Istio's order). A host another VirtualService
	// of the same group already routes is a conflict; one of the other group routes it
	// for these proxies and this one does not (per host, as Istio keeps the first virtual
	// host of a domain).
	type vsEntry struct {
		vs         *networkingv1.VirtualService
		restricted bool
		err        *configError
	}
	var order []vsEntry
	for pass := range 2 {
		for _, vs := range tc.VirtualServices {
			if gatewayOnly(vs) {
				continue // planned by planIngress
			}
			x := sh.vsExp[vs]
			restricted := !x.visible().all
			if (pass == 0) != restricted || !scope.sees(x.id, x.visible()) {
				continue
			}
			order = append(order, vsEntry{vs, restricted, x.err})
		}
	}
	vsOwner := map[mesh.Hostname]vsEntry{}
	statusOf := map[*networkingv1.VirtualService]ConfigStatus{}
	for _, e := range order {
		vs := e.vs
		st := ConfigStatus{Kind: KindVirtualService, Namespace: vs.Namespace, Name: vs.Name, ResourceVersion: vs.ResourceVersion, UID: string(vs.UID)}
		err := e.err
		var routes map[mesh.Hostname]map[uint16][]*route.Route
		var keys string
		var warn []string
		if err == nil {
			routes, keys, warn, err = sh.vsMemo.plan(v, tc.Domain, vs, p.hosts, scope.hidden)
		}
		if err == nil {
			for _, h := range slices.Sorted(maps.Keys(routes)) {
				if o, ok := vsOwner[h]; ok && o.restricted == e.restricted {
					err = rejectConfig(ReasonConflict, "host %s is already routed by VirtualService %s/%s", h, o.vs.Namespace, o.vs.Name)
					break
				}
			}
		}
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
			statusOf[vs] = st
			continue
		}
		for _, h := range slices.Sorted(maps.Keys(routes)) {
			st.Hosts = append(st.Hosts, string(h))
			if _, taken := vsOwner[h]; taken {
				continue // a restricted VirtualService routes h for these proxies
			}
			vsOwner[h] = e
			hp := host(h)
			hp.routes = routes[h]
			hp.key += "vs:" + vs.Namespace + "/" + vs.Name + "@" + vs.ResourceVersion + ";" + keys + ";"
		}
		st.Applied, st.Warnings = true, warn
		statusOf[vs] = st
	}
	for _, vs := range tc.VirtualServices { // status in creation order
		if st, ok := statusOf[vs]; ok {
			p.parts.vss = append(p.parts.vss, st)
		}
	}
	p.sidecars, p.parts.sidecars = planSidecars(root, tc.Sidecars)
	p.status = slices.Concat(p.parts.entries, p.parts.drs, p.parts.ingress, p.parts.vss, p.parts.sidecars)
	return p
}

// drWarnings are a rule's warnings, plus one when it is in a namespace that is neither
// its host's nor the root namespace: Istio looks a rule up in the proxy's namespace,
// then the host's, then the root namespace, so such a rule applies only to the proxies
// of its own namespace.
func drWarnings(r drResult, dr *networkingv1.DestinationRule, v *View, root string) []string {
	svc := v.Service(r.host)
	if svc == nil || dr.Namespace == svc.Key.Namespace || dr.Namespace == root {
		return r.warn
	}
	return append(slices.Clone(r.warn), fmt.Sprintf("applies only to proxies in namespace %s: a DestinationRule is looked up in the proxy's namespace, then the host's (%s), then the root namespace (%s)", dr.Namespace, svc.Key.Namespace, root))
}

// planDestinationRule validates one DestinationRule: its host must be a service of the
// view, its subsets distinct DNS labels, every layer of its traffic policy one the
// clients implement (policy.go). It returns the host's own plan and its subsets'.
func planDestinationRule(v *View, domain string, dr *networkingv1.DestinationRule) (mesh.Hostname, subsetPlan, []subsetPlan, []string, *configError) {
	var warn []string
	h, err := resolveHost(dr.Spec.GetHost(), dr.Namespace, domain)
	if err != nil {
		return "", subsetPlan{}, nil, nil, err
	}
	svc := v.Service(h)
	if svc == nil {
		return "", subsetPlan{}, nil, nil, rejectConfig(ReasonUnknownHost, "host %s: no such service in the mesh", h)
	}
	if dr.Spec.GetWorkloadSelector() != nil {
		return "", subsetPlan{}, nil, nil, rejectConfig(ReasonUnsupported, "workloadSelector is not supported yet")
	}
	if _, err := parseExportTo(dr.Namespace, dr.Spec.GetExportTo(), false); err != nil {
		return "", subsetPlan{}, nil, nil, err
	}
	for i, s := range dr.Spec.GetSubsets() {
		if errs := validation.IsDNS1123Label(s.GetName()); len(errs) > 0 {
			return "", subsetPlan{}, nil, nil, rejectConfig(ReasonInvalid, "subsets[%d].name %q: %s", i, s.GetName(), strings.Join(errs, "; "))
		}
		if slices.ContainsFunc(dr.Spec.GetSubsets()[:i], func(o *apinet.Subset) bool { return o.GetName() == s.GetName() }) {
			return "", subsetPlan{}, nil, nil, rejectConfig(ReasonInvalid, "subsets[%d].name %q: duplicate subset", i, s.GetName())
		}
	}
	base, perSubset, w, err := planPolicies(&dr.Spec, svc.Ports)
	if err != nil {
		return "", subsetPlan{}, nil, nil, err
	}
	warn = append(warn, w...)
	var subsets []subsetPlan
	for i, s := range dr.Spec.GetSubsets() {
		subsets = append(subsets, subsetPlan{name: s.GetName(), labels: s.GetLabels(), ports: perSubset[i]})
	}
	slices.SortFunc(subsets, func(a, b subsetPlan) int { return cmp.Compare(a.name, b.name) })
	slices.Sort(warn)
	return h, subsetPlan{ports: base}, subsets, slices.Compact(warn), nil
}

// planVirtualService validates and translates one VirtualService into routes per host
// and port. keys describes the destinations' ports, which the routes depend on.
func planVirtualService(v *View, domain string, vs *networkingv1.VirtualService, hosts map[mesh.Hostname]*hostPlan) (map[mesh.Hostname]map[uint16][]*route.Route, string, []string, *configError) {
	spec := &vs.Spec
	var warn []string
	if gws := spec.GetGateways(); len(gws) > 0 && !slices.Contains(gws, "mesh") {
		return nil, "", nil, rejectConfig(ReasonUnsupported, "gateways %v: VirtualServices bound only to gateways are not supported yet (mesh traffic is unaffected)", gws)
	}
	if len(spec.GetTcp()) > 0 || len(spec.GetTls()) > 0 {
		return nil, "", nil, rejectConfig(ReasonUnsupported, "tcp and tls routes are not supported yet")
	}
	if len(spec.GetHttp()) == 0 {
		return nil, "", nil, rejectConfig(ReasonInvalid, "http: at least one route is required (tcp and tls routes are not supported yet)")
	}
	if len(spec.GetHosts()) == 0 {
		return nil, "", nil, rejectConfig(ReasonInvalid, "hosts: at least one host is required")
	}
	var vsHosts []*MergedService
	for i, h := range spec.GetHosts() {
		hn, err := resolveHost(h, vs.Namespace, domain)
		if err != nil {
			err.msg = fmt.Sprintf("hosts[%d]: %s", i, err.msg)
			return nil, "", nil, err
		}
		svc := v.Service(hn)
		if svc == nil {
			return nil, "", nil, rejectConfig(ReasonUnknownHost, "hosts[%d]: %s: no such service in the mesh", i, hn)
		}
		if !slices.Contains(vsHosts, svc) {
			vsHosts = append(vsHosts, svc)
		}
	}
	keys := map[string]bool{}
	out := map[mesh.Hostname]map[uint16][]*route.Route{}
	for _, svc := range vsHosts {
		out[svc.Hostname] = map[uint16][]*route.Route{}
		for _, port := range svc.Ports {
			var routes []*route.Route
			for i, hr := range spec.GetHttp() {
				field := fmt.Sprintf("http[%d]", i)
				if hr.GetName() != "" {
					field += " (" + hr.GetName() + ")"
				}
				action, w, err := routeAction(v, domain, vs.Namespace, field, hr, port.Port, hosts, keys)
				if err != nil {
					return nil, "", nil, err
				}
				warn = append(warn, w...)
				fault, err := routeFault(field, hr.GetFault())
				if err != nil {
					return nil, "", nil, err
				}
				matches := hr.GetMatch()
				if len(matches) == 0 {
					matches = []*apinet.HTTPMatchRequest{{}} // no match: every request
				}
				for j, m := range matches {
					rm, err := routeMatch(fmt.Sprintf("%s.match[%d]", field, j), m)
					if err != nil {
						return nil, "", nil, err
					}
					routes = append(routes, &route.Route{Name: hr.GetName(), Match: rm, Action: action, TypedPerFilterConfig: fault})
				}
			}
			out[svc.Hostname][port.Port] = routes
		}
	}
	slices.Sort(warn)
	return out, strings.Join(slices.Sorted(maps.Keys(keys)), ","), slices.Compact(warn), nil
}

// routeMatch translates one HTTPMatchRequest (uri and headers; every other condition is
// refused, since ignoring a condition would send more traffic to the route than the
// user asked for).
func routeMatch(field string, m *apinet.HTTPMatchRequest) (*route.RouteMatch, *configError) {
	switch {
	case m.GetScheme() != nil, m.GetMethod() != nil, m.GetAuthority() != nil, len(m.GetQueryParams()) > 0,
		len(m.GetWithoutHeaders()) > 0, m.GetPort() != 0, len(m.GetSourceLabels()) > 0, len(m.GetGateways()) > 0,
		m.GetSourceNamespace() != "", m.GetIgnoreUriCase():
		return nil, rejectConfig(ReasonUnsupported, "%s: only uri and headers matches are supported yet", field)
	}
	rm := &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}}
	if u := m.GetUri(); u != nil {
		switch x := u.GetMatchType().(type) {
		case *apinet.StringMatch_Exact:
			rm.PathSpecifier = &route.RouteMatch_Path{Path: x.Exact}
		case *apinet.StringMatch_Prefix:
			rm.PathSpecifier = &route.RouteMatch_Prefix{Prefix: x.Prefix}
		case *apinet.StringMatch_Regex:
			if _, err := regexp.Compile(x.Regex); err != nil {
				return nil, rejectConfig(ReasonBadRegex, "%s.uri.regex %q: %v", field, x.Regex, err)
			}
			rm.PathSpecifier = &route.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: x.Regex}}
		default:
			return nil, rejectConfig(ReasonInvalid, "%s.uri: one of exact, prefix or regex is required", field)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(m.GetHeaders())) {
		sm := m.GetHeaders()[name]
		hf := fmt.Sprintf("%s.headers[%s]", field, name)
		if errs := validation.IsHTTPHeaderName(name); len(errs) > 0 || strings.HasPrefix(name, ":") {
			return nil, rejectConfig(ReasonInvalid, "%s: not a header name", hf)
		}
		var s *matcherv3.StringMatcher
		switch x := sm.GetMatchType().(type) {
		case *apinet.StringMatch_Exact:
			s = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: x.Exact}}
		case *apinet.StringMatch_Prefix:
			s = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: x.Prefix}}
		case *apinet.StringMatch_Regex:
			if _, err := regexp.Compile(x.Regex); err != nil {
				return nil, rejectConfig(ReasonBadRegex, "%s.regex %q: %v", hf, x.Regex, err)
			}
			s = &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: x.Regex}}}
		default:
			// Istio: an empty match means "the header is present".
			rm.Headers = append(rm.Headers, &route.HeaderMatcher{Name: name, HeaderMatchSpecifier: &route.HeaderMatcher_PresentMatch{PresentMatch: true}})
			continue
		}
		rm.Headers = append(rm.Headers, &route.HeaderMatcher{Name: name, HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: s}})
	}
	return rm, nil
}

// routeAction translates an HTTPRoute's destinations for a request that arrived on port
// listenPort: one destination is a plain cluster, several are weighted clusters whose
// weights must sum to 100 (destinations of weight 0 get no traffic and are left out).
func routeAction(v *View, domain, ns, field string, hr *apinet.HTTPRoute, listenPort uint16, hosts map[mesh.Hostname]*hostPlan, keys map[string]bool) (*route.Route_Route, []string, *configError) {
	switch {
	case hr.GetRedirect() != nil, hr.GetDirectResponse() != nil, hr.GetDelegate() != nil, hr.GetRewrite() != nil,
		hr.GetMirror() != nil, len(hr.GetMirrors()) > 0, hr.GetHeaders() != nil, hr.GetCorsPolicy() != nil:
		return nil, nil, rejectConfig(ReasonUnsupported, "%s: only match and route are supported yet (not redirect, directResponse, delegate, rewrite, mirror, headers, corsPolicy)", field)
	}
	dests := hr.GetRoute()
	if len(dests) == 0 {
		return nil, nil, rejectConfig(ReasonInvalid, "%s.route: at least one destination is required", field)
	}
	sum := int32(0)
	var weighted []*route.WeightedCluster_ClusterWeight
	var hash []*route.RouteAction_HashPolicy
	for i, d := range dests {
		df := fmt.Sprintf("%s.route[%d].destination", field, i)
		name, h, err := destinationCluster(v, domain, ns, df, d.GetDestination(), listenPort, hosts, keys)
		if err != nil {
			return nil, nil, err
		}
		if d.GetWeight() > 0 || len(dests) == 1 {
			hash = append(hash, h...)
		}
		if d.GetWeight() < 0 {
			return nil, nil, rejectConfig(ReasonBadWeights, "%s.route[%d].weight %d is negative", field, i, d.GetWeight())
		}
		if d.GetHeaders() != nil {
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.route[%d].headers is not supported yet", field, i)
		}
		sum += d.GetWeight()
		if len(dests) == 1 {
			ra := &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: name}}
			addHash(ra, hash)
			warn, err := timeoutAndRetries(field, hr, ra)
			if err != nil {
				return nil, nil, err
			}
			return &route.Route_Route{Route: ra}, warn, nil
		}
		if d.GetWeight() > 0 {
			weighted = append(weighted, &route.WeightedCluster_ClusterWeight{Name: name, Weight: wrapperspb.UInt32(uint32(d.GetWeight()))})
		}
	}
	if sum != 100 {
		return nil, nil, rejectConfig(ReasonBadWeights, "%s.route: weights sum to %d, not 100", field, sum)
	}
	ra := &route.RouteAction{ClusterSpecifier: &route.RouteAction_WeightedClusters{
		WeightedClusters: &route.WeightedCluster{Clusters: weighted},
	}}
	addHash(ra, hash)
	warn, err := timeoutAndRetries(field, hr, ra)
	if err != nil {
		return nil, nil, err
	}
	return &route.Route_Route{Route: ra}, warn, nil
}

// destinationCluster resolves a destination to its cluster name and the hash policies
// its DestinationRule asks routes to it for: the host must be a service, the subset one
// of its DestinationRule's, the port one of its ports (when unset: the port the request
// arrived on if the service has it, else its only port).
func destinationCluster(v *View, domain, ns, field string, d *apinet.Destination, listenPort uint16, hosts map[mesh.Hostname]*hostPlan, keys map[string]bool) (string, []*route.RouteAction_HashPolicy, *configError) {
	if d == nil {
		return "", nil, rejectConfig(ReasonInvalid, "%s: required", field)
	}
	h, err := resolveHost(d.GetHost(), ns, domain)
	if err != nil {
		err.msg = field + ".host: " + err.msg
		return "", nil, err
	}
	svc := v.Service(h)
	if svc == nil {
		return "", nil, rejectConfig(ReasonUnknownHost, "%s.host %s: no such service in the mesh", field, h)
	}
	sp, ok := hosts[h].subset(d.GetSubset())
	if !ok {
		return "", nil, rejectConfig(ReasonUnknownSubset, "%s.subset %q: no applied DestinationRule for %s defines it", field, d.GetSubset(), h)
	}
	var ports []string
	has := func(p uint16) bool {
		return slices.ContainsFunc(svc.Ports, func(sp ServicePort) bool { return sp.Port == p })
	}
	for _, p := range svc.Ports {
		ports = append(ports, strconv.Itoa(int(p.Port)))
	}
	// The routes depend on the destination's ports and, through hash policies, on its
	// DestinationRule.
	keys[string(h)+"="+strings.Join(ports, "/")+hosts[h].drKeyOrEmpty()] = true
	var port uint16
	switch n := d.GetPort().GetNumber(); {
	case n != 0:
		if n > 65535 || !has(uint16(n)) {
			return "", nil, rejectConfig(ReasonUnknownPort, "%s.port %d: %s has ports %s", field, n, h, strings.Join(ports, ", "))
		}
		port = uint16(n)
	case has(listenPort):
		port = listenPort
	case len(svc.Ports) == 1:
		port = svc.Ports[0].Port
	default:
		return "", nil, rejectConfig(ReasonUnknownPort, "%s.port: required, since %s has several ports (%s) and not %d", field, h, strings.Join(ports, ", "), listenPort)
	}
	return mesh.OutboundName{Port: port, Subset: d.GetSubset(), Host: h}.ClusterName(), sp.policy(port).routeHash(), nil
}

// selectLabels returns the endpoints whose labels include every one of want (all of them
// when want is empty).
func selectLabels(eps []mesh.Endpoint, want map[string]string) []mesh.Endpoint {
	if len(want) == 0 {
		return eps
	}
	var out []mesh.Endpoint
	for _, e := range eps {
		ok := true
		for k, v := range want {
			if got, has := e.Labels[k]; !has || got != v {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, e)
		}
	}
	return out
}

// keyOrEmpty returns hp's key; a nil plan has the empty key.
func (hp *hostPlan) keyOrEmpty() string {
	if hp == nil {
		return ""
	}
	return hp.key
}

// drKeyOrEmpty returns the DestinationRule part of hp's key.
func (hp *hostPlan) drKeyOrEmpty() string {
	if hp == nil {
		return ""
	}
	return hp.drKey
}

// routesFor returns the VirtualService routes of one port, or nil for the default route.
func (hp *hostPlan) routesFor(port uint16) []*route.Route {
	if hp == nil || hp.routes == nil {
		return nil
	}
	return hp.routes[port]
}

// trafficPlanFor returns the public traffic plan of v (what proxies that see only objects
// exported everywhere get, with every object's status), computed once per registry
// version: every view key built from one registry view shares it, and the primary reads
// its status for /debug/configz.
func (b *Builder) trafficPlanFor(v *View) *trafficPlan { return b.trafficPlansFor(v).public }

// trafficPlansFor returns every traffic plan of v, computed once per registry version.
func (b *Builder) trafficPlansFor(v *View) *trafficPlans {
	if b.plans == nil || b.planVersion != v.Version || v.Version == 0 {
		b.plans, b.planVersion = planTrafficSet(v), v.Version
	}
	return b.plans
}
