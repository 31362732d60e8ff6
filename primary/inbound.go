package primary

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	apisec "istio.io/api/security/v1beta1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// InboundListenerTemplate is the server_listener_resource_name_template an xDS-enabled
// gRPC server's bootstrap must carry (gRFC A36): grpc-go's xds.NewGRPCServer asks for the
// Listener named by it with %s replaced by its listening address ("10.0.0.7:8080",
// "[fd00::7]:8080"), and the primary serves one such Listener per workload address.
const InboundListenerTemplate = "grpc/server?xds.resource.listening_address=%s"

// InboundListenerName is the Listener an xDS-enabled gRPC server listening on addr asks
// for.
func InboundListenerName(addr netip.AddrPort) string {
	return fmt.Sprintf(InboundListenerTemplate, addr.String())
}

// LabelXDSServer set to "true" on a pod says its server is xDS-enabled (grpc-go's
// xds.NewGRPCServer): the primary then serves an inbound Listener for each of its
// endpoint addresses and ports to proxyless clients of its network. The opt-in keeps
// every other pod's endpoints out of the proxyless views.
const LabelXDSServer = "isthmus.io/xds-server"

// Names of the inbound RBAC filters; grpc-go refuses two filters of the same name.
const (
	rbacDenyFilter  = "isthmus.rbac.deny"
	rbacAllowFilter = "isthmus.rbac.allow"
)

// peerPolicy is one applied PeerAuthentication: its scope, its level (0 mesh, 1
// namespace, 2 workload; a more specific level wins), its mode and its per-port modes.
type peerPolicy struct {
	scope workloadScope
	level int
	mode  apisec.PeerAuthentication_MutualTLS_Mode
	ports map[uint32]apisec.PeerAuthentication_MutualTLS_Mode
}

// securityPlan is the validated security configuration of one registry view.
type securityPlan struct {
	known  bool // the view carries a SecurityConfig; without one no inbound is served
	authz  []*authzPolicy
	peers  []*peerPolicy // in precedence order
	status []ConfigStatus
	fed    FederationExports // peers' callers are denied what is not exported to them (federation.go)
}

// planSecurity validates and translates v's security configuration. It is pure; every
// object is applied whole or refused whole (AuthorizationPolicies fail closed, see
// planAuthorizationPolicy; a refused PeerAuthentication changes nothing).
func planSecurity(v *View) *securityPlan {
	sp := &securityPlan{fed: v.Exports}
	sc := v.Security
	if sc == nil {
		return sp
	}
	sp.known = true
	for _, ap := range sc.AuthorizationPolicies {
		st := ConfigStatus{Kind: KindAuthorizationPolicy, Namespace: ap.Namespace, Name: ap.Name, ResourceVersion: ap.ResourceVersion, UID: string(ap.UID), Applied: true}
		p, err := planAuthorizationPolicy(sc.RootNamespace, ap)
		if err != nil {
			st.Applied, st.Reason, st.Message = false, err.reason, err.msg
			if p != nil {
				st.Warnings = append(st.Warnings, "refused, so it fails closed: an ALLOW policy allows nothing on its workloads, a DENY policy denies every request")
			}
		}
		if p != nil {
			sp.authz = append(sp.authz, p)
		}
		sp.status = append(sp.status, st)
	}
	seen := map[string]string{} // namespace-wide and mesh-wide objects by scope
	for _, pa := range sc.PeerAuthentications {
		st := ConfigStatus{Kind: KindPeerAuthentication, Namespace: pa.Namespace, Name: pa.Name, ResourceVersion: pa.ResourceVersion, UID: string(pa.UID), Applied: true}
		p, warn, err := planPeerAuthentication(sc.RootNamespace, pa.Namespace, &pa.Spec)
		if err == nil && p.scope.selector == nil {
			if first, ok := seen[pa.Namespace]; ok {
				err = rejectConfig(ReasonConflict, "another PeerAuthentication without selector, %s, already applies to namespace %s (the oldest wins)", first, pa.Namespace)
			}
			seen[pa.Namespace] = pa.Name
		}
		if err != nil {
			st.Applied, st.Reason, st.Message = false, err.reason, err.msg
		} else {
			sp.peers = append(sp.peers, p)
			st.Warnings = warn
		}
		sp.status = append(sp.status, st)
	}
	return sp
}

// planPeerAuthentication validates one PeerAuthentication. DISABLE is refused: proxyless
// clients send mTLS to every pod labelled security.istio.io/tlsMode=istio, so a server
// taking plaintext would refuse them all.
func planPeerAuthentication(root, ns string, spec *apisec.PeerAuthentication) (*peerPolicy, []string, *configError) {
	sel := spec.GetSelector().GetMatchLabels()
	p := &peerPolicy{scope: scopeOf(root, ns, sel), mode: spec.GetMtls().GetMode()}
	switch {
	case sel != nil:
		// Unlike an AuthorizationPolicy, a PeerAuthentication with a selector selects
		// workloads of its own namespace only, the root namespace included (Istio's rule).
		p.scope, p.level = workloadScope{namespace: ns, selector: sel}, 2
	case !p.scope.mesh:
		p.level = 1
	}
	check := func(field string, m apisec.PeerAuthentication_MutualTLS_Mode) *configError {
		switch m {
		case apisec.PeerAuthentication_MutualTLS_UNSET, apisec.PeerAuthentication_MutualTLS_PERMISSIVE, apisec.PeerAuthentication_MutualTLS_STRICT:
			return nil
		case apisec.PeerAuthentication_MutualTLS_DISABLE:
			return rejectConfig(ReasonUnsupported, "%s DISABLE: proxyless clients send mTLS to pods labelled %s=%s; remove the label instead", field, LabelTLSMode, TLSModeIstio)
		}
		return rejectConfig(ReasonInvalid, "%s: unknown mode %d", field, m)
	}
	if err := check("mtls.mode", p.mode); err != nil {
		return nil, nil, err
	}
	if len(spec.GetPortLevelMtls()) > 0 {
		if sel == nil {
			return nil, nil, rejectConfig(ReasonInvalid, "portLevelMtls needs a selector (as in Istio)")
		}
		p.ports = map[uint32]apisec.PeerAuthentication_MutualTLS_Mode{}
		for port, m := range spec.GetPortLevelMtls() {
			if port == 0 || port > 65535 {
				return nil, nil, rejectConfig(ReasonInvalid, "portLevelMtls[%d]: not a port", port)
			}
			if err := check(fmt.Sprintf("portLevelMtls[%d].mode", port), m.GetMode()); err != nil {
				return nil, nil, err
			}
			p.ports[port] = m.GetMode()
		}
	}
	var warn []string
	if p.mode == apisec.PeerAuthentication_MutualTLS_PERMISSIVE {
		warn = append(warn, "PERMISSIVE on an xDS-enabled gRPC server: grpc-go cannot take TLS and plaintext on one port, so pods labelled "+LabelTLSMode+"="+TLSModeIstio+" take mTLS only and other pods plaintext only")
	}
	return p, warn, nil
}

// strict reports whether a workload's port requires mTLS: the most specific
// PeerAuthentication that sets a mode decides (workload port, workload, namespace, mesh;
// the oldest of a level), and UNSET defers to the next. Without any, the mode is
// PERMISSIVE, as in Istio.
func (sp *securityPlan) strict(ns string, labels map[string]string, port uint32) bool {
	mode := apisec.PeerAuthentication_MutualTLS_UNSET
	best := -1
	for _, p := range sp.peers {
		if p.level <= best || !p.scope.selects(ns, labels) {
			continue
		}
		m := p.mode
		if pm, ok := p.ports[port]; ok && pm != apisec.PeerAuthentication_MutualTLS_UNSET {
			m = pm
		}
		if m != apisec.PeerAuthentication_MutualTLS_UNSET {
			mode, best = m, p.level
		}
	}
	return mode == apisec.PeerAuthentication_MutualTLS_STRICT
}

// securityState is the builder's memo for inbound listeners: the plan of the last
// SecurityConfig and each view's per-service inbound listeners.
type securityState struct {
	plan    *securityPlan
	planFor *SecurityConfig
	fedGen  uint64 // the View's ExportsGen the plan was made for
	memo    map[ViewKey]map[mesh.Hostname]*inboundResources
}

// inboundResources are one service's inbound listeners in one view, built for a service
// generation and a plan.
type inboundResources struct {
	gen       uint64
	plan      *securityPlan
	listeners []types.Resource
}

// securityPlanFor returns the security plan of v, computed once per SecurityConfig.
func (b *Builder) securityPlanFor(v *View) *securityPlan {
	if b.sec == nil {
		b.sec = &securityState{memo: map[ViewKey]map[mesh.Hostname]*inboundResources{}}
	}
	if b.sec.plan == nil || b.sec.planFor != v.Security || b.sec.fedGen != v.ExportsGen {
		b.sec.plan, b.sec.planFor, b.sec.fedGen = planSecurity(v), v.Security, v.ExportsGen
	}
	return b.sec.plan
}

// inboundListeners returns the inbound Listeners of a proxyless view: one per address and
// port of every endpoint on key's network whose pod is labelled LabelXDSServer=true, each
// with that workload's mTLS mode and RBAC. None until the view carries a SecurityConfig:
// an xDS-enabled server without its Listener does not serve, which is the safe state
// while policy is unknown (a restarted primary must not open every server for a moment).
// A pod backing several services gets one Listener per address (the first service's, by
// hostname; the content depends only on the pod).
func (b *Builder) inboundListeners(v *View, key ViewKey) ([]types.Resource, error) {
	sp := b.securityPlanFor(v)
	if !sp.known {
		return nil, nil
	}
	old := b.sec.memo[key]
	next := map[mesh.Hostname]*inboundResources{}
	var out []types.Resource
	seen := map[string]bool{}
	for _, svc := range v.Services {
		ir := old[svc.Hostname]
		if ir == nil || ir.gen != svc.Gen || ir.plan != sp {
			ls, err := serviceInbound(svc, key, sp)
			if err != nil {
				return nil, err
			}
			ir = &inboundResources{gen: svc.Gen, plan: sp, listeners: ls}
		}
		next[svc.Hostname] = ir // also when empty: an unchanged service is not scanned again
		for _, l := range ir.listeners {
			if name := l.(*listener.Listener).Name; !seen[name] {
				seen[name] = true
				out = append(out, l)
			}
		}
	}
	b.sec.memo[key] = next
	return out, nil
}

// serviceInbound builds the inbound listeners of one service's opted-in endpoints.
func serviceInbound(svc *MergedService, key ViewKey, sp *securityPlan) ([]types.Resource, error) {
	var out []types.Resource
	for _, ep := range svc.Endpoints {
		if ep.Labels[LabelXDSServer] != "true" || ep.Network != key.Network {
			continue
		}
		for _, p := range ep.Ports {
			mtls := ep.MTLSReady || sp.strict(svc.Key.Namespace, ep.Labels, uint32(p.Number))
			deny, allow := rbacFor(sp.authz, svc.Key.Namespace, ep.Labels)
			deny = sp.fed.denyPeers(deny, svc.Key)
			l, err := inboundListener(netip.AddrPortFrom(ep.Address, p.Number), mtls, deny, allow)
			if err != nil {
				return nil, err
			}
			out = append(out, l)
		}
	}
	return out, nil
}

// inboundListener is the Listener of an xDS-enabled gRPC server on addr (gRFC A36): one
// filter chain whose transport socket, when mtls, is a DownstreamTlsContext requiring a
// client certificate, with identity and roots from the bootstrap's certificate provider
// (as the client side uses them); and an HttpConnectionManager with the RBAC filters (deny
// first, then allow; each only when a policy of that action applies), the router, and one
// route of action NonForwardingAction (grpc-go fails RPCs matching any other action).
// Without a transport socket grpc-go serves with the fallback credentials (plaintext).
func inboundListener(addr netip.AddrPort, mtls bool, deny, allow *rbacv3.RBAC) (*listener.Listener, error) {
	var filters []*hcm.HttpFilter
	for _, f := range []struct {
		name string
		r    *rbacv3.RBAC
	}{{rbacDenyFilter, deny}, {rbacAllowFilter, allow}} {
		if f.r == nil {
			continue
		}
		a, err := anypb.New(&rbacfilter.RBAC{Rules: f.r})
		if err != nil {
			return nil, err
		}
		filters = append(filters, &hcm.HttpFilter{Name: f.name, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: a}})
	}
	rf, err := routerFilter()
	if err != nil {
		return nil, err
	}
	filters = append(filters, rf)
	name := "inbound|" + strconv.Itoa(int(addr.Port()))
	m := &hcm.HttpConnectionManager{
		StatPrefix: "inbound_" + strings.NewReplacer("[", "", "]", "").Replace(addr.String()),
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: name,
			VirtualHosts: []*route.VirtualHost{{Name: name, Domains: []string{"*"}, Routes: []*route.Route{{
				Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_NonForwardingAction{NonForwardingAction: &route.NonForwardingAction{}},
			}}}},
		}},
		HttpFilters: filters,
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, err
	}
	fc := &listener.FilterChain{
		Name:    name,
		Filters: []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: a}}},
	}
	if mtls {
		if fc.TransportSocket, err = grpcDownstreamTLS(); err != nil {
			return nil, err
		}
	}
	return &listener.Listener{
		Name:         InboundListenerName(addr),
		Address:      socketAddress(addr.Addr().String(), uint32(addr.Port())),
		FilterChains: []*listener.FilterChain{fc},
	}, nil
}

// grpcDownstreamTLS is the server side of grpcUpstreamTLS: the workload's certificate and
// the roots callers are verified against come from the bootstrap's certificate provider,
// and a client certificate is required (its URI SAN is the principal RBAC matches).
func grpcDownstreamTLS() (*core.TransportSocket, error) {
	ctx := &tlsv3.DownstreamTlsContext{
		RequireClientCertificate: wrapperspb.Bool(true),
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: mesh.CertProviderInstance, CertificateName: mesh.SDSIdentitySecret},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: mesh.CertProviderInstance, CertificateName: mesh.SDSRootSecret},
			}},
		},
	}
	a, err := anypb.New(ctx)
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}
