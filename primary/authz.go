package primary

import (
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	apisec "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Kinds of Istio security objects in ConfigStatus and the rejection metric.
const (
	KindAuthorizationPolicy = "AuthorizationPolicy"
	KindPeerAuthentication  = "PeerAuthentication"
)

// workloadScope is which workloads an Istio security object applies to: the whole mesh
// (no selector in the root namespace), one namespace (no selector), or the workloads of
// one namespace whose labels include every selector label.
type workloadScope struct {
	mesh      bool
	namespace string
	selector  map[string]string // nil: every workload of the namespace
}

// selects reports whether the scope covers a workload of namespace ns with labels. A
// selector in the root namespace selects workloads of every namespace, as in Istio.
func (s workloadScope) selects(ns string, labels map[string]string) bool {
	if !s.mesh && s.namespace != ns {
		return false
	}
	for k, v := range s.selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// scopeOf derives the scope of an object of namespace ns with selector labels sel (nil:
// no selector).
func scopeOf(root, ns string, sel map[string]string) workloadScope {
	return workloadScope{mesh: root != "" && ns == root, namespace: ns, selector: sel}
}

// authzPolicy is one AuthorizationPolicy as translated: its scope, its action and one
// RBAC policy per rule, named <namespace>.<name>.rule[<i>].
type authzPolicy struct {
	scope    workloadScope
	deny     bool
	policies map[string]*rbacv3.Policy
}

// appliesTo reports whether the policy covers a workload.
func (p *authzPolicy) appliesTo(ns string, labels map[string]string) bool {
	return p.scope.selects(ns, labels)
}

// denyAll is the RBAC policy of a refused DENY policy: every request of its workloads.
func denyAll() *rbacv3.Policy {
	return &rbacv3.Policy{
		Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
		Principals:  []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
	}
}

// planAuthorizationPolicy validates and translates one AuthorizationPolicy. It returns the
// policy to enforce and, when the object is refused, the refusal. A refused object is
// never half-applied: none of its rules is enforced. It fails closed instead, as Istio
// does: a refused ALLOW policy still counts as an ALLOW policy with no rules (its workloads
// accept only what another ALLOW policy allows), a refused DENY policy denies every
// request of its workloads. Only a policy whose workloads cannot be told (targetRef)
// applies to nothing.
func planAuthorizationPolicy(root string, ap *securityv1.AuthorizationPolicy) (*authzPolicy, *configError) {
	spec := &ap.Spec
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return nil, rejectConfig(ReasonUnsupported, "targetRef(s): policies bound to a Gateway or Service are not supported; use selector")
	}
	p := &authzPolicy{scope: scopeOf(root, ap.Namespace, spec.GetSelector().GetMatchLabels()), policies: map[string]*rbacv3.Policy{}}
	var err *configError
	switch spec.GetAction() {
	case apisec.AuthorizationPolicy_ALLOW:
	case apisec.AuthorizationPolicy_DENY:
		p.deny = true
	default:
		err = rejectConfig(ReasonUnsupported, "action %s: only ALLOW and DENY are supported", spec.GetAction())
	}
	if err == nil && spec.GetProvider() != nil {
		err = rejectConfig(ReasonUnsupported, "provider: CUSTOM authorization is not supported")
	}
	for i, r := range spec.GetRules() {
		if err != nil {
			break
		}
		name := fmt.Sprintf("%s.%s.rule[%d]", ap.Namespace, ap.Name, i)
		var pol *rbacv3.Policy
		if pol, err = rulePolicy(fmt.Sprintf("rules[%d]", i), r); err == nil {
			p.policies[name] = pol
		}
	}
	if err != nil {
		p.policies = map[string]*rbacv3.Policy{}
		if p.deny {
			p.policies[ap.Namespace+"."+ap.Name+".refused"] = denyAll()
		}
		return p, err
	}
	return p, nil
}

// rulePolicy translates one rule: a request matches when one of its from entries, one of
// its to entries (each "any" when the list is empty) and every when condition match. A
// rule with nothing in it matches every request (Istio's "allow all" rule).
func rulePolicy(field string, r *apisec.Rule) (*rbacv3.Policy, *configError) {
	var principals []*rbacv3.Principal
	var froms []*rbacv3.Principal
	for i, f := range r.GetFrom() {
		src, err := sourcePrincipal(fmt.Sprintf("%s.from[%d].source", field, i), f.GetSource())
		if err != nil {
			return nil, err
		}
		froms = append(froms, src)
	}
	if len(froms) > 0 {
		principals = append(principals, orIDs(froms))
	}
	var perms, tos []*rbacv3.Permission
	for i, t := range r.GetTo() {
		op, err := operationPermission(fmt.Sprintf("%s.to[%d].operation", field, i), t.GetOperation())
		if err != nil {
			return nil, err
		}
		tos = append(tos, op)
	}
	if len(tos) > 0 {
		perms = append(perms, orRules(tos))
	}
	for i, c := range r.GetWhen() {
		cf := fmt.Sprintf("%s.when[%d]", field, i)
		perm, prin, err := condition(cf, c)
		if err != nil {
			return nil, err
		}
		if perm != nil {
			perms = append(perms, perm)
		}
		if prin != nil {
			principals = append(principals, prin)
		}
	}
	return &rbacv3.Policy{Permissions: []*rbacv3.Permission{andRules(perms)}, Principals: []*rbacv3.Principal{andIDs(principals)}}, nil
}

// sourcePrincipal translates a source: every field set must match (AND), and within a
// field one of its values (OR).
func sourcePrincipal(field string, s *apisec.Source) (*rbacv3.Principal, *configError) {
	if s == nil {
		return nil, rejectConfig(ReasonInvalid, "%s: missing", field)
	}
	switch {
	case len(s.GetRequestPrincipals()) > 0, len(s.GetNotRequestPrincipals()) > 0:
		return nil, rejectConfig(ReasonUnsupported, "%s.requestPrincipals: JWT principals are not supported (no RequestAuthentication)", field)
	case len(s.GetIpBlocks()) > 0, len(s.GetNotIpBlocks()) > 0, len(s.GetRemoteIpBlocks()) > 0, len(s.GetNotRemoteIpBlocks()) > 0:
		return nil, rejectConfig(ReasonUnsupported, "%s.ipBlocks/remoteIpBlocks: address-based sources are not supported (identities cross gateways; addresses do not)", field)
	case len(s.GetServiceAccounts()) > 0, len(s.GetNotServiceAccounts()) > 0, len(s.GetTrustDomains()) > 0, len(s.GetNotTrustDomains()) > 0:
		return nil, rejectConfig(ReasonUnsupported, "%s.serviceAccounts/trustDomains: not supported; use principals", field)
	}
	var ids []*rbacv3.Principal
	add := func(sub string, values []string, not bool, one func(string, string) (*rbacv3.Principal, *configError)) *configError {
		if len(values) == 0 {
			return nil
		}
		var alts []*rbacv3.Principal
		for i, v := range values {
			p, err := one(fmt.Sprintf("%s.%s[%d]", field, sub, i), v)
			if err != nil {
				return err
			}
			alts = append(alts, p)
		}
		p := orIDs(alts)
		if not {
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
		}
		ids = append(ids, p)
		return nil
	}
	for _, f := range []struct {
		sub    string
		values []string
		not    bool
		one    func(string, string) (*rbacv3.Principal, *configError)
	}{
		{"principals", s.GetPrincipals(), false, principalID},
		{"notPrincipals", s.GetNotPrincipals(), true, principalID},
		{"namespaces", s.GetNamespaces(), false, namespaceID},
		{"notNamespaces", s.GetNotNamespaces(), true, namespaceID},
	} {
		if err := add(f.sub, f.values, f.not, f.one); err != nil {
			return nil, err
		}
	}
	return andIDs(ids), nil
}

// principalID matches the caller's SPIFFE ID: Istio writes principals without the
// spiffe:// scheme ("cluster.local/ns/demo/sa/client"), with "*" alone (any authenticated
// caller), as a prefix ("cluster.local/*") or as a suffix ("*/sa/client"). grpc-go and
// Envoy compare it with the URI SAN of the client certificate.
func principalID(field, v string) (*rbacv3.Principal, *configError) {
	if v == "*" {
		return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{}}}, nil
	}
	sm, err := wildcardMatcher(field, v, "spiffe://")
	if err != nil {
		return nil, err
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: sm}}}, nil
}

// namespaceID matches callers whose SPIFFE ID is in a namespace (…/ns/<namespace>/…), as
// Istio translates source.namespaces; "*" matches any authenticated caller, and a leading
// or trailing "*" matches a namespace suffix or prefix.
func namespaceID(field, v string) (*rbacv3.Principal, *configError) {
	if v == "*" {
		return principalID(field, v)
	}
	if strings.Trim(v, "*") == "" || strings.Contains(strings.Trim(v, "*"), "*") || strings.Contains(v, "/") {
		return nil, rejectConfig(ReasonInvalid, "%s %q: want a namespace, optionally with one leading or trailing *", field, v)
	}
	ns := regexp.QuoteMeta(strings.Trim(v, "*"))
	switch {
	case strings.HasPrefix(v, "*"):
		ns = "[^/]*" + ns
	case strings.HasSuffix(v, "*"):
		ns += "[^/]*"
	}
	sm := &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "spiffe://[^/]+/ns/" + ns + "/.*"}}}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: sm}}}, nil
}

// wildcardMatcher is Istio's string match: exact, "prefix*", "*suffix" (prefixed with
// scheme in the exact and prefix forms). "*" alone is the caller's concern; an empty value
// or a "*" anywhere else is refused.
func wildcardMatcher(field, v, scheme string) (*matcherv3.StringMatcher, *configError) {
	inner := strings.TrimSuffix(strings.TrimPrefix(v, "*"), "*")
	if v == "" || inner == "" || strings.Contains(inner, "*") || (strings.HasPrefix(v, "*") && strings.HasSuffix(v, "*")) {
		return nil, rejectConfig(ReasonInvalid, "%s %q: want an exact value, or one leading or trailing *", field, v)
	}
	switch {
	case strings.HasPrefix(v, "*"):
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Suffix{Suffix: inner}}, nil
	case strings.HasSuffix(v, "*"):
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: scheme + inner}}, nil
	}
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: scheme + v}}, nil
}

// operationPermission translates an operation: paths (the gRPC method's
// "/package.Service/Method") and methods (":method", which grpc-go fixes to POST).
func operationPermission(field string, op *apisec.Operation) (*rbacv3.Permission, *configError) {
	if op == nil {
		return nil, rejectConfig(ReasonInvalid, "%s: missing", field)
	}
	if len(op.GetHosts()) > 0 || len(op.GetNotHosts()) > 0 || len(op.GetPorts()) > 0 || len(op.GetNotPorts()) > 0 {
		return nil, rejectConfig(ReasonUnsupported, "%s: hosts and ports are not supported; use paths and methods", field)
	}
	var rules []*rbacv3.Permission
	for _, f := range []struct {
		sub    string
		values []string
		not    bool
		one    func(string, string) (*rbacv3.Permission, *configError)
	}{
		{"paths", op.GetPaths(), false, pathPermission},
		{"notPaths", op.GetNotPaths(), true, pathPermission},
		{"methods", op.GetMethods(), false, methodPermission},
		{"notMethods", op.GetNotMethods(), true, methodPermission},
	} {
		if len(f.values) == 0 {
			continue
		}
		var alts []*rbacv3.Permission
		for i, v := range f.values {
			p, err := f.one(fmt.Sprintf("%s.%s[%d]", field, f.sub, i), v)
			if err != nil {
				return nil, err
			}
			alts = append(alts, p)
		}
		p := orRules(alts)
		if f.not {
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
		}
		rules = append(rules, p)
	}
	return andRules(rules), nil
}

// pathPermission matches the request path; "*" matches every path.
func pathPermission(field, v string) (*rbacv3.Permission, *configError) {
	if v == "*" {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}, nil
	}
	if !strings.HasPrefix(v, "/") && !strings.HasPrefix(v, "*") {
		return nil, rejectConfig(ReasonInvalid, "%s %q: a path starts with / (a gRPC path is /package.Service/Method)", field, v)
	}
	sm, err := wildcardMatcher(field, v, "")
	if err != nil {
		return nil, err
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: sm}}}}, nil
}

// methodPermission matches the HTTP method exactly; "*" matches every method. gRPC calls
// are always POST.
func methodPermission(field, v string) (*rbacv3.Permission, *configError) {
	if v == "*" {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}, nil
	}
	if v == "" || strings.ContainsAny(v, "* \t") {
		return nil, rejectConfig(ReasonInvalid, "%s %q: want an HTTP method", field, v)
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &route.HeaderMatcher{Name: ":method",
		HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: v}}}}}}, nil
}

// requestHeaderKey matches a when key request.headers[<name>].
var requestHeaderKey = regexp.MustCompile(`^request\.headers\[([^\]]+)\]$`)

// condition translates one when condition into a permission (request headers) or a
// principal (source.principal, source.namespace).
func condition(field string, c *apisec.Condition) (*rbacv3.Permission, *rbacv3.Principal, *configError) {
	if len(c.GetValues()) == 0 && len(c.GetNotValues()) == 0 {
		return nil, nil, rejectConfig(ReasonInvalid, "%s (%s): values or notValues is required", field, c.GetKey())
	}
	switch key := c.GetKey(); {
	case key == "source.principal" || key == "source.namespace":
		one := principalID
		if key == "source.namespace" {
			one = namespaceID
		}
		build := func(sub string, values []string) (*rbacv3.Principal, *configError) {
			var alts []*rbacv3.Principal
			for i, v := range values {
				p, err := one(fmt.Sprintf("%s.%s[%d]", field, sub, i), v)
				if err != nil {
					return nil, err
				}
				alts = append(alts, p)
			}
			return orIDs(alts), nil
		}
		var ids []*rbacv3.Principal
		if len(c.GetValues()) > 0 {
			p, err := build("values", c.GetValues())
			if err != nil {
				return nil, nil, err
			}
			ids = append(ids, p)
		}
		if len(c.GetNotValues()) > 0 {
			p, err := build("notValues", c.GetNotValues())
			if err != nil {
				return nil, nil, err
			}
			ids = append(ids, &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}})
		}
		return nil, andIDs(ids), nil
	case requestHeaderKey.MatchString(key):
		name := strings.ToLower(requestHeaderKey.FindStringSubmatch(key)[1])
		// grpc-go refuses a whole listener whose RBAC matches grpc-* headers or :scheme
		// (gRFC A41), so such a condition is refused here, alone.
		if errs := validation.IsHTTPHeaderName(name); len(errs) > 0 || strings.HasPrefix(name, "grpc-") {
			return nil, nil, rejectConfig(ReasonInvalid, "%s: header %q: want an HTTP header name that is not a pseudo-header or grpc-*", field, name)
		}
		build := func(sub string, values []string) (*rbacv3.Permission, *configError) {
			var alts []*rbacv3.Permission
			for i, v := range values {
				hm := &route.HeaderMatcher{Name: name}
				if v == "*" {
					hm.HeaderMatchSpecifier = &route.HeaderMatcher_PresentMatch{PresentMatch: true}
				} else {
					sm, err := wildcardMatcher(fmt.Sprintf("%s.%s[%d]", field, sub, i), v, "")
					if err != nil {
						return nil, err
					}
					hm.HeaderMatchSpecifier = &route.HeaderMatcher_StringMatch{StringMatch: sm}
				}
				alts = append(alts, &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: hm}})
			}
			return orRules(alts), nil
		}
		var rules []*rbacv3.Permission
		if len(c.GetValues()) > 0 {
			p, err := build("values", c.GetValues())
			if err != nil {
				return nil, nil, err
			}
			rules = append(rules, p)
		}
		if len(c.GetNotValues()) > 0 {
			p, err := build("notValues", c.GetNotValues())
			if err != nil {
				return nil, nil, err
			}
			rules = append(rules, &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}})
		}
		return andRules(rules), nil, nil
	default:
		return nil, nil, rejectConfig(ReasonUnsupported, "%s: key %q is not supported (request.headers[...], source.principal and source.namespace are)", field, key)
	}
}

// orIDs is one principal matching any of ps (ps itself when it has one element).
func orIDs(ps []*rbacv3.Principal) *rbacv3.Principal {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ps}}}
}

// andIDs is one principal matching all of ps; none is "any".
func andIDs(ps []*rbacv3.Principal) *rbacv3.Principal {
	switch len(ps) {
	case 0:
		return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
	case 1:
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: ps}}}
}

// orRules is one permission matching any of ps.
func orRules(ps []*rbacv3.Permission) *rbacv3.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: ps}}}
}

// andRules is one permission matching all of ps; none is "any".
func andRules(ps []*rbacv3.Permission) *rbacv3.Permission {
	switch len(ps) {
	case 0:
		return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
	case 1:
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: ps}}}
}

// rbacFor merges the policies that apply to one workload into the RBAC configurations its
// inbound listener enforces, DENY before ALLOW (Istio's order): deny is nil when no DENY
// policy applies; allow is nil when no ALLOW policy applies (then everything not denied
// is allowed), and an ALLOW configuration without policies denies everything.
func rbacFor(pols []*authzPolicy, ns string, labels map[string]string) (deny, allow *rbacv3.RBAC) {
	for _, p := range pols {
		if !p.appliesTo(ns, labels) {
			continue
		}
		target := &allow
		action := rbacv3.RBAC_ALLOW
		if p.deny {
			target, action = &deny, rbacv3.RBAC_DENY
		}
		if *target == nil {
			*target = &rbacv3.RBAC{Action: action, Policies: map[string]*rbacv3.Policy{}}
		}
		maps.Copy((*target).Policies, p.policies)
	}
	return deny, allow
}

// policyNames returns an RBAC configuration's policy names, sorted (for keys and tests).
func policyNames(r *rbacv3.RBAC) []string {
	if r == nil {
		return nil
	}
	return slices.Sorted(maps.Keys(r.Policies))
}
