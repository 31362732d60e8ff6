package primary

import (
	"cmp"
	"crypto/tls"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	apinet "istio.io/api/networking/v1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// KindGateway is the Gateway kind in ConfigStatus and the rejection metric.
const KindGateway = "Gateway"

// CredentialPrefix starts the SDS name of a Gateway server's certificate:
// "kubernetes://<credentialName>", Istio's spelling.
const CredentialPrefix = "kubernetes://"

// CACertSuffix ends the SDS name of the client CA a MUTUAL server verifies clients with:
// "kubernetes://<credentialName>-cacert", Istio's spelling; it comes from the
// credential Secret's ca.crt.
const CACertSuffix = "-cacert"

// Ingress listener settings every HTTP connection manager of an ingress carries, so that
// a slow or oversized client is cut off by the proxy rather than held.
const (
	ingressHeadersTimeout = 10 * time.Second
	ingressIdleTimeout    = 5 * time.Minute
	ingressMaxHeadersKB   = 60 // Envoy's default, written out so every data plane applies it
)

// GatewayCredential is one kubernetes.io/tls Secret of the ingress gateways' namespace, as
// the ingress watcher read it (already checked to be a matching certificate and key).
type GatewayCredential struct {
	Namespace, Name, ResourceVersion string
	CertChain, Key                   []byte
	// CACert is the Secret's ca.crt, when it has one: the client CA of MUTUAL servers.
	CACert []byte
}

// IngressConfig is one immutable snapshot of what configures ingress gateways: the
// Gateways (in precedence order) and the Secrets their servers may name in
// credentialName, keyed "namespace/name".
type IngressConfig struct {
	Gateways    []*networkingv1.Gateway
	Credentials map[string]GatewayCredential
}

// SetIngressConfig replaces the ingress configuration the next View carries; nil removes
// it. Neither c nor what it holds is modified afterwards.
func (r *Registry) SetIngressConfig(c *IngressConfig) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ingress = c
	r.version++
	r.ingressGen = r.version
	r.notifyLocked()
}

// ingressLabels reads a router's LABELS metadata into the canonical "k=v,k=v" form (sorted
// by key); "" means the router is no ingress (no labels, or ROUTER_MODE sni-dnat).
func ingressLabels(fields map[string]*structpb.Value) (string, error) {
	if fields[MetaRouterMode].GetStringValue() == "sni-dnat" {
		return "", nil
	}
	lv, ok := fields[MetaLabels]
	if !ok {
		return "", nil
	}
	st := lv.GetStructValue()
	if st == nil {
		return "", fmt.Errorf("metadata %s: want a struct of strings", MetaLabels)
	}
	m := map[string]string{}
	for k, v := range st.GetFields() {
		s, ok := v.GetKind().(*structpb.Value_StringValue)
		if !ok {
			return "", fmt.Errorf("metadata %s[%q]: want a string", MetaLabels, k)
		}
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return "", fmt.Errorf("metadata %s: key %q: %s", MetaLabels, k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(s.StringValue); len(errs) > 0 {
			return "", fmt.Errorf("metadata %s[%q]: %s", MetaLabels, k, strings.Join(errs, "; "))
		}
		m[k] = s.StringValue
	}
	if len(m) == 0 {
		return "", nil
	}
	return canonicalLabels(m), nil
}

// canonicalLabels is m as "k=v,k=v", sorted by key.
func canonicalLabels(m map[string]string) string {
	var b strings.Builder
	for i, k := range slices.Sorted(maps.Keys(m)) {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(k + "=" + m[k])
	}
	return b.String()
}

// parseLabels reverses canonicalLabels.
func parseLabels(s string) map[string]string {
	m := map[string]string{}
	if s == "" {
		return m
	}
	for kv := range strings.SplitSeq(s, ",") {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

// ingressPlan is the validated Gateways and the VirtualServices bound to gateways, for
// every ingress view of one registry view.
type ingressPlan struct {
	gateways []*gatewayPlan // applied, in precedence order
	services []*gatewayVS   // applied, in precedence order
}

// gatewayPlan is one applied Gateway.
type gatewayPlan struct {
	ns, name string
	selector map[string]string
	servers  []gatewayServer
}

func (g *gatewayPlan) ref() string { return g.ns + "/" + g.name }

// Server classes: how a port's connections are handled.
const (
	serverHTTP        = "http"        // plaintext HTTP (HTTP, HTTP2, GRPC)
	serverHTTPS       = "https"       // TLS terminated (SIMPLE), then HTTP
	serverPassthrough = "passthrough" // TLS passed through by SNI
	serverTCP         = "tcp"
)

// gatewayServer is one server of a Gateway.
type gatewayServer struct {
	port       uint32
	portName   string
	class      string
	hosts      []gatewayHost
	credential string // SIMPLE and MUTUAL: the Secret's name
	mutual     bool   // MUTUAL: clients must present a certificate from the Secret's ca.crt
	redirect   bool   // tls.httpsRedirect
}

// gatewayHost is a server's "namespace/dnsName" host: ns "*" admits VirtualServices of
// every namespace; dns is an FQDN, "*.suffix" or "*".
type gatewayHost struct{ ns, dns string }

// admits reports whether a VirtualService host h of namespace vsNS fits this server host.
func (gh gatewayHost) admits(vsNS, h string) bool {
	if gh.ns != "*" && gh.ns != vsNS {
		return false
	}
	return hostMatches(gh.dns, h)
}

// hostMatches reports whether host h (maybe itself a wildcard) falls under pattern p.
func hostMatches(p, h string) bool {
	switch {
	case p == "*":
		return true
	case strings.HasPrefix(p, "*."):
		return strings.HasSuffix(h, p[1:]) && len(h) > len(p)-1
	default:
		return p == h
	}
}

// gatewayVS is one applied VirtualService bound to gateways.
type gatewayVS struct {
	ns, name string
	gateways []string // "namespace/name"
	hosts    []string
	http     []*route.Route
	tls      []gatewayTLSRoute
	tcp      string // the first tcp route's cluster, "" when none
}

// gatewayTLSRoute passes TLS with one of sni through to cluster.
type gatewayTLSRoute struct {
	sni     []string
	cluster string
}

// gatewayOnly reports whether vs is bound only to gateways (not "mesh"), so the sidecar
// plan leaves it to the ingress plan.
func gatewayOnly(vs *networkingv1.VirtualService) bool {
	gws := vs.Spec.GetGateways()
	return len(gws) > 0 && !slices.Contains(gws, "mesh")
}

// planIngress validates every Gateway and every VirtualService bound to a gateway. A
// VirtualService bound to "mesh" as well is planned by planTraffic for the mesh and here
// for its gateways. hosts carries the applied DestinationRules' subsets.
func planIngress(v *View, tc *TrafficConfig, hosts map[mesh.Hostname]*hostPlan) (*ingressPlan, []ConfigStatus) {
	p := &ingressPlan{}
	var status []ConfigStatus
	known := map[string]bool{}
	var gateways []*networkingv1.Gateway
	if v.Ingress != nil {
		gateways = v.Ingress.Gateways
	}
	for _, gw := range gateways {
		st := ConfigStatus{Kind: KindGateway, Namespace: gw.Namespace, Name: gw.Name, ResourceVersion: gw.ResourceVersion, UID: string(gw.UID)}
		g, warn, err := planGateway(gw)
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
		} else {
			p.gateways = append(p.gateways, g)
			known[g.ref()] = true
			st.Applied, st.Warnings = true, warn
			for _, s := range g.servers {
				for _, h := range s.hosts {
					st.Hosts = append(st.Hosts, h.dns)
				}
			}
			st.Hosts = slices.Compact(slices.Sorted(slices.Values(st.Hosts)))
		}
		status = append(status, st)
	}
	for _, vs := range tc.VirtualServices {
		if len(vs.Spec.GetGateways()) == 0 || (!gatewayOnly(vs) && len(vs.Spec.GetGateways()) == 1) {
			continue // mesh only: planTraffic's
		}
		g, err := planGatewayVS(v, tc.Domain, vs, hosts)
		if !gatewayOnly(vs) {
			// Also a mesh VirtualService: planTraffic reports it; a gateway part that
			// does not plan is dropped, and says so only in the log of that status.
			if err == nil {
				p.services = append(p.services, g)
			}
			continue
		}
		st := ConfigStatus{Kind: KindVirtualService, Namespace: vs.Namespace, Name: vs.Name, ResourceVersion: vs.ResourceVersion, UID: string(vs.UID)}
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
		} else {
			p.services = append(p.services, g)
			st.Applied, st.Hosts = true, g.hosts
			for _, ref := range g.gateways {
				if !known[ref] {
					st.Warnings = append(st.Warnings, fmt.Sprintf("gateway %s is not an applied Gateway", ref))
				}
			}
		}
		status = append(status, st)
	}
	return p, status
}

// planGateway validates one Gateway's servers.
func planGateway(gw *networkingv1.Gateway) (*gatewayPlan, []string, *configError) {
	g := &gatewayPlan{ns: gw.Namespace, name: gw.Name, selector: gw.Spec.GetSelector()}
	var warn []string
	if len(gw.Spec.GetServers()) == 0 {
		return nil, nil, rejectConfig(ReasonInvalid, "servers: at least one server is required")
	}
	classOf := map[uint32]string{}
	for i, s := range gw.Spec.GetServers() {
		f := fmt.Sprintf("servers[%d]", i)
		port := s.GetPort()
		if port.GetNumber() == 0 || port.GetNumber() > 65535 {
			return nil, nil, rejectConfig(ReasonInvalid, "%s.port.number %d: want 1-65535", f, port.GetNumber())
		}
		if s.GetBind() != "" || s.GetDefaultEndpoint() != "" || port.GetTargetPort() != 0 {
			return nil, nil, rejectConfig(ReasonUnsupported, "%s: bind, defaultEndpoint and port.targetPort are not supported", f)
		}
		srv := gatewayServer{port: port.GetNumber(), portName: cmp.Or(port.GetName(), strings.ToLower(port.GetProtocol())+"-"+strconv.Itoa(int(port.GetNumber())))}
		t := s.GetTls()
		if t != nil && (t.GetServerCertificate() != "" || t.GetPrivateKey() != "" || t.GetCaCertificates() != "" || len(t.GetCredentialNames()) > 0 ||
			len(t.GetTlsCertificates()) > 0 || len(t.GetSubjectAltNames()) > 0 || t.GetCaCertCredentialName() != "" || t.GetCaCrl() != "") {
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.tls: only mode, credentialName and httpsRedirect are supported (not file certificates, credentialNames, tlsCertificates, CA settings, subjectAltNames)", f)
		}
		if t != nil && (t.GetMinProtocolVersion() != 0 || t.GetMaxProtocolVersion() != 0 || len(t.GetCipherSuites()) > 0) {
			warn = append(warn, f+".tls: protocol versions and cipher suites are not honoured (TLS 1.2+ with Go's defaults)")
		}
		switch proto := strings.ToUpper(port.GetProtocol()); proto {
		case "HTTP", "HTTP2", "GRPC":
			srv.class = serverHTTP
			if t != nil {
				if t.GetMode() != apinet.ServerTLSSettings_PASSTHROUGH || t.GetCredentialName() != "" {
					return nil, nil, rejectConfig(ReasonInvalid, "%s.tls: a %s server takes only httpsRedirect", f, proto)
				}
				srv.redirect = t.GetHttpsRedirect()
			}
		case "HTTPS", "TLS":
			switch t.GetMode() {
			case apinet.ServerTLSSettings_SIMPLE, apinet.ServerTLSSettings_MUTUAL:
				if proto == "TLS" {
					return nil, nil, rejectConfig(ReasonUnsupported, "%s.tls.mode %s on a TLS server (terminate, then TCP) is not supported yet", f, t.GetMode())
				}
				srv.class = serverHTTPS
				srv.credential, srv.mutual = t.GetCredentialName(), t.GetMode() == apinet.ServerTLSSettings_MUTUAL
				if srv.credential == "" {
					return nil, nil, rejectConfig(ReasonInvalid, "%s.tls.credentialName: required for mode %s", f, t.GetMode())
				}
				if errs := validation.IsDNS1123Subdomain(srv.credential); len(errs) > 0 {
					return nil, nil, rejectConfig(ReasonInvalid, "%s.tls.credentialName %q: %s (a Secret of the gateway's own namespace)", f, srv.credential, strings.Join(errs, "; "))
				}
			case apinet.ServerTLSSettings_PASSTHROUGH:
				if t == nil && proto == "HTTPS" {
					return nil, nil, rejectConfig(ReasonInvalid, "%s.tls: required on an HTTPS server", f)
				}
				srv.class = serverPassthrough
			default:
				return nil, nil, rejectConfig(ReasonUnsupported, "%s.tls.mode %s is not supported yet (SIMPLE, MUTUAL and PASSTHROUGH are)", f, t.GetMode())
			}
			if t.GetHttpsRedirect() {
				warn = append(warn, f+".tls.httpsRedirect applies to HTTP servers only")
			}
		case "TCP":
			srv.class = serverTCP
			if t != nil {
				return nil, nil, rejectConfig(ReasonInvalid, "%s.tls: a TCP server takes none", f)
			}
		default:
			return nil, nil, rejectConfig(ReasonUnsupported, "%s.port.protocol %q: want HTTP, HTTPS, HTTP2, GRPC, TLS or TCP", f, port.GetProtocol())
		}
		if c, ok := classOf[srv.port]; ok && c != srv.class {
			return nil, nil, rejectConfig(ReasonConflict, "%s: port %d is already a %s server", f, srv.port, c)
		}
		classOf[srv.port] = srv.class
		if len(s.GetHosts()) == 0 {
			return nil, nil, rejectConfig(ReasonInvalid, "%s.hosts: at least one host is required", f)
		}
		for j, h := range s.GetHosts() {
			gh, err := parseGatewayHost(h)
			if err != nil {
				return nil, nil, rejectConfig(ReasonInvalid, "%s.hosts[%d] %q: %v", f, j, h, err)
			}
			srv.hosts = append(srv.hosts, gh)
		}
		g.servers = append(g.servers, srv)
	}
	return g, warn, nil
}

// parseGatewayHost parses "[namespace/]dnsName"; a missing namespace is "*".
func parseGatewayHost(h string) (gatewayHost, error) {
	ns, dns, ok := strings.Cut(h, "/")
	if !ok {
		ns, dns = "*", h
	}
	switch ns {
	case "*":
	case ".":
		return gatewayHost{}, fmt.Errorf(`namespace "." is not supported yet`)
	default:
		if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
			return gatewayHost{}, fmt.Errorf("namespace: %s", strings.Join(errs, "; "))
		}
	}
	if err := checkHostPattern(dns); err != nil {
		return gatewayHost{}, err
	}
	return gatewayHost{ns: ns, dns: dns}, nil
}

// checkHostPattern accepts "*", "*.suffix" and DNS names.
func checkHostPattern(h string) error {
	if h == "*" {
		return nil
	}
	name := strings.TrimPrefix(h, "*.")
	if strings.Contains(name, "*") {
		return fmt.Errorf("a wildcard may only be the whole first label")
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// planGatewayVS translates a VirtualService's gateway part: its hosts are names clients
// use (any DNS name, not only mesh services), its http routes go to mesh services as for
// sidecars; tls routes pass SNI hosts through and tcp routes forward, each to one
// destination.
func planGatewayVS(v *View, domain string, vs *networkingv1.VirtualService, hosts map[mesh.Hostname]*hostPlan) (*gatewayVS, *configError) {
	spec := &vs.Spec
	g := &gatewayVS{ns: vs.Namespace, name: vs.Name}
	for i, ref := range spec.GetGateways() {
		if ref == "mesh" {
			continue
		}
		ns, name, ok := strings.Cut(ref, "/")
		if !ok {
			ns, name = vs.Namespace, ref
		}
		if len(validation.IsDNS1123Label(ns)) > 0 || len(validation.IsDNS1123Subdomain(name)) > 0 {
			return nil, rejectConfig(ReasonInvalid, "gateways[%d] %q: want [namespace/]name", i, ref)
		}
		g.gateways = append(g.gateways, ns+"/"+name)
	}
	if len(spec.GetHosts()) == 0 {
		return nil, rejectConfig(ReasonInvalid, "hosts: at least one host is required")
	}
	for i, h := range spec.GetHosts() {
		if err := checkHostPattern(h); err != nil {
			return nil, rejectConfig(ReasonInvalid, "hosts[%d] %q: %v", i, h, err)
		}
		g.hosts = append(g.hosts, h)
	}
	if len(spec.GetHttp())+len(spec.GetTls())+len(spec.GetTcp()) == 0 {
		return nil, rejectConfig(ReasonInvalid, "http, tls, tcp: at least one route is required")
	}
	keys := map[string]bool{}
	for i, hr := range spec.GetHttp() {
		field := fmt.Sprintf("http[%d]", i)
		action, _, err := routeAction(v, domain, vs.Namespace, field, hr, 0, hosts, keys)
		if err != nil {
			return nil, err
		}
		fault, err := routeFault(field, hr.GetFault())
		if err != nil {
			return nil, err
		}
		matches := hr.GetMatch()
		if len(matches) == 0 {
			matches = []*apinet.HTTPMatchRequest{{}}
		}
		for j, m := range matches {
			rm, err := routeMatch(fmt.Sprintf("%s.match[%d]", field, j), m)
			if err != nil {
				return nil, err
			}
			g.http = append(g.http, &route.Route{Name: hr.GetName(), Match: rm, Action: action, TypedPerFilterConfig: fault})
		}
	}
	single := func(field string, rds []*apinet.RouteDestination) (string, *configError) {
		if len(rds) != 1 {
			return "", rejectConfig(ReasonUnsupported, "%s.route: exactly one destination is supported (got %d)", field, len(rds))
		}
		name, _, err := destinationCluster(v, domain, vs.Namespace, field+".route[0].destination", rds[0].GetDestination(), 0, hosts, keys)
		return name, err
	}
	for i, tr := range spec.GetTls() {
		field := fmt.Sprintf("tls[%d]", i)
		name, err := single(field, tr.GetRoute())
		if err != nil {
			return nil, err
		}
		r := gatewayTLSRoute{cluster: name}
		for j, m := range tr.GetMatch() {
			if len(m.GetDestinationSubnets()) > 0 || m.GetPort() != 0 || len(m.GetSourceLabels()) > 0 || len(m.GetGateways()) > 0 || m.GetSourceNamespace() != "" {
				return nil, rejectConfig(ReasonUnsupported, "%s.match[%d]: only sniHosts is supported", field, j)
			}
			for k, h := range m.GetSniHosts() {
				if err := checkHostPattern(h); err != nil {
					return nil, rejectConfig(ReasonInvalid, "%s.match[%d].sniHosts[%d] %q: %v", field, j, k, h, err)
				}
				r.sni = append(r.sni, h)
			}
		}
		if len(r.sni) == 0 {
			return nil, rejectConfig(ReasonInvalid, "%s.match: sniHosts are required", field)
		}
		g.tls = append(g.tls, r)
	}
	for i, tr := range spec.GetTcp() {
		field := fmt.Sprintf("tcp[%d]", i)
		if len(tr.GetMatch()) > 0 {
			return nil, rejectConfig(ReasonUnsupported, "%s.match is not supported", field)
		}
		name, err := single(field, tr.GetRoute())
		if err != nil {
			return nil, err
		}
		if g.tcp == "" {
			g.tcp = name
		}
	}
	return g, nil
}

// selects reports whether g applies to a proxy with labels.
func (g *gatewayPlan) selects(labels map[string]string) bool {
	for k, v := range g.selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// boundServer is one server of a Gateway selected for the view.
type boundServer struct {
	gw  *gatewayPlan
	srv gatewayServer
}

// buildIngress builds an ingress view: listeners and routes from the Gateways selecting
// its labels, every service's clusters and endpoints as a sidecar of its network gets
// them, and the certificates its HTTPS servers name from its own namespace.
func (b *Builder) buildIngress(v *View, key ViewKey) (Resources, error) {
	plan := b.trafficPlanFor(v)
	memoKey := ViewKey{Kind: ProxyIngress, Network: key.Network, Locality: key.Locality}
	old := b.memo[memoKey]
	next := make(map[mesh.Hostname]*serviceResources, len(v.Services))
	res := Resources{}
	sideKey := ViewKey{Kind: ProxySidecar, Network: key.Network, Locality: key.Locality}
	for _, svc := range v.Services {
		hp := plan.hosts[svc.Hostname]
		sr := old[svc.Hostname]
		if sr == nil || sr.gen != svc.Gen || sr.gwGen != v.GatewaysGen || sr.planKey != hp.keyOrEmpty() {
			var err error
			if sr, err = buildService(svc, sideKey, v.Gateways, hp); err != nil {
				return nil, err
			}
			sr.gen, sr.gwGen, sr.planKey = svc.Gen, v.GatewaysGen, hp.keyOrEmpty()
		}
		next[svc.Hostname] = sr
		res[resource.ClusterType] = append(res[resource.ClusterType], sr.clusters...)
		res[resource.EndpointType] = append(res[resource.EndpointType], sr.endpoints...)
	}
	b.memo[memoKey] = next
	ing := plan.ingress
	if ing == nil { // no traffic configuration: Gateways without VirtualServices
		ing, _ = planIngress(v, &TrafficConfig{}, plan.hosts)
	}
	labels := parseLabels(key.Labels)
	byPort := map[uint32][]boundServer{}
	for _, g := range ing.gateways {
		if !g.selects(labels) {
			continue
		}
		for _, s := range g.servers {
			if prev := byPort[s.port]; len(prev) > 0 && prev[0].srv.class != s.class {
				continue // another Gateway took the port with another class first
			}
			byPort[s.port] = append(byPort[s.port], boundServer{g, s})
		}
	}
	secrets := map[string]bool{}
	for _, port := range slices.Sorted(maps.Keys(byPort)) {
		servers := byPort[port]
		l, routes, err := ingressListener(port, servers, ing.services)
		if err != nil {
			return nil, err
		}
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
		for _, rc := range routes {
			res[resource.RouteType] = append(res[resource.RouteType], rc)
		}
		for _, s := range servers {
			if s.srv.credential != "" {
				secrets[s.srv.credential] = secrets[s.srv.credential] || s.srv.mutual
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(secrets)) {
		var c GatewayCredential
		ok := false
		if v.Ingress != nil {
			c, ok = v.Ingress.Credentials[key.Namespace+"/"+name]
		}
		if !ok || key.Namespace == "" {
			continue // the listener waits for it, as Envoy's does
		}
		res[resource.SecretType] = append(res[resource.SecretType], &tlsv3.Secret{
			Name: CredentialPrefix + name,
			Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: c.CertChain}},
				PrivateKey:       &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: c.Key}},
			}},
		})
		if secrets[name] && len(c.CACert) > 0 { // a MUTUAL server's client CA; without it the chain waits
			res[resource.SecretType] = append(res[resource.SecretType], &tlsv3.Secret{
				Name: CredentialPrefix + name + CACertSuffix,
				Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
					TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: c.CACert}},
				}},
			})
		}
	}
	return res, nil
}

// boundTo reports whether vs is bound to gateway g.
func (vs *gatewayVS) boundTo(g *gatewayPlan) bool { return slices.Contains(vs.gateways, g.ref()) }

// vhostsFor returns the virtual hosts of the VirtualServices bound to the servers' gateways,
// one per VirtualService host a server admits (the first VirtualService to claim a host
// wins, in precedence order).
func vhostsFor(port uint32, servers []boundServer, services []*gatewayVS) []*route.VirtualHost {
	var out []*route.VirtualHost
	seen := map[string]bool{}
	for _, vs := range services {
		for _, h := range vs.hosts {
			if seen[h] || len(vs.http) == 0 {
				continue
			}
			var redirect, ok bool
			for _, s := range servers {
				if vs.boundTo(s.gw) && slices.ContainsFunc(s.srv.hosts, func(gh gatewayHost) bool { return gh.admits(vs.ns, h) }) {
					ok, redirect = true, redirect || s.srv.redirect
				}
			}
			if !ok {
				continue
			}
			seen[h] = true
			hp := h + ":" + strconv.Itoa(int(port))
			vh := &route.VirtualHost{Name: hp, Domains: []string{h, hp}, Routes: vs.http}
			if redirect {
				vh.RequireTls = route.VirtualHost_ALL
			}
			out = append(out, vh)
		}
	}
	slices.SortFunc(out, func(a, b *route.VirtualHost) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// ingressHCM is an ingress HTTP connection manager reading routes over RDS.
func ingressHCM(statPrefix, routeName string) (*anypb.Any, error) {
	filters, err := httpFilters()
	if err != nil {
		return nil, err
	}
	return anypb.New(&hcm.HttpConnectionManager{
		StatPrefix:            statPrefix,
		RouteSpecifier:        &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{ConfigSource: adsSource(), RouteConfigName: routeName}},
		HttpFilters:           filters,
		UseRemoteAddress:      wrapperspb.Bool(true),
		RequestHeadersTimeout: durationpb.New(ingressHeadersTimeout),
		StreamIdleTimeout:     durationpb.New(ingressIdleTimeout),
		MaxRequestHeadersKb:   wrapperspb.UInt32(ingressMaxHeadersKB),
		CommonHttpProtocolOptions: &core.HttpProtocolOptions{
			IdleTimeout: durationpb.New(ingressIdleTimeout),
		},
	})
}

// tcpProxy is a tcp_proxy filter to cluster.
func tcpProxy(cluster string) (*listener.Filter, error) {
	tp, err := anypb.New(&tcpproxy.TcpProxy{StatPrefix: cluster, ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: cluster}})
	if err != nil {
		return nil, err
	}
	return &listener.Filter{Name: wellknown.TCPProxy, ConfigType: &listener.Filter_TypedConfig{TypedConfig: tp}}, nil
}

// serverNames are the SNI names of a server's hosts; "*" matches every name (none listed).
func serverNames(hosts []gatewayHost) []string {
	var out []string
	for _, h := range hosts {
		if h.dns == "*" {
			return nil
		}
		out = append(out, h.dns)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// ingressListener is the listener of one port and the route configurations it reads.
func ingressListener(port uint32, servers []boundServer, services []*gatewayVS) (*listener.Listener, []*route.RouteConfiguration, error) {
	ps := strconv.Itoa(int(port))
	l := &listener.Listener{Name: "0.0.0.0_" + ps, Address: socketAddress("0.0.0.0", port)}
	var routes []*route.RouteConfiguration
	switch servers[0].srv.class {
	case serverHTTP:
		name := "http." + ps
		m, err := ingressHCM("outbound_0.0.0.0_"+ps, name)
		if err != nil {
			return nil, nil, err
		}
		l.FilterChains = []*listener.FilterChain{{Filters: []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: m}}}}}
		routes = append(routes, &route.RouteConfiguration{Name: name, VirtualHosts: vhostsFor(port, servers, services)})
	case serverHTTPS:
		for _, s := range servers {
			name := strings.Join([]string{"https", ps, s.srv.portName, s.gw.name, s.gw.ns}, ".")
			m, err := ingressHCM("outbound_0.0.0.0_"+ps, name)
			if err != nil {
				return nil, nil, err
			}
			dtc := &tlsv3.DownstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
				TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: CredentialPrefix + s.srv.credential, SdsConfig: adsSource()}},
				AlpnProtocols:                  []string{"h2", "http/1.1"},
				TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
			}}
			if s.srv.mutual {
				// Istio's MUTUAL: a client certificate is required and verified against
				// the credential's ca.crt, delivered as its own SDS validation context.
				dtc.RequireClientCertificate = wrapperspb.Bool(true)
				dtc.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_CombinedValidationContext{
					CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
						DefaultValidationContext:         &tlsv3.CertificateValidationContext{},
						ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: CredentialPrefix + s.srv.credential + CACertSuffix, SdsConfig: adsSource()},
					}}
			}
			ts, err := anypb.New(dtc)
			if err != nil {
				return nil, nil, err
			}
			l.FilterChains = append(l.FilterChains, &listener.FilterChain{
				Name:             name,
				FilterChainMatch: &listener.FilterChainMatch{ServerNames: serverNames(s.srv.hosts), TransportProtocol: "tls"},
				TransportSocket:  &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: ts}},
				Filters:          []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: m}}},
			})
			routes = append(routes, &route.RouteConfiguration{Name: name, VirtualHosts: vhostsFor(port, []boundServer{s}, services)})
		}
	case serverPassthrough:
		seen := map[string]bool{}
		for _, vs := range services {
			for _, tr := range vs.tls {
				var names []string
				for _, sni := range tr.sni {
					if seen[sni] {
						continue
					}
					for _, s := range servers {
						if vs.boundTo(s.gw) && slices.ContainsFunc(s.srv.hosts, func(gh gatewayHost) bool { return gh.admits(vs.ns, sni) }) {
							names = append(names, sni)
							seen[sni] = true
							break
						}
					}
				}
				if len(names) == 0 {
					continue
				}
				f, err := tcpProxy(tr.cluster)
				if err != nil {
					return nil, nil, err
				}
				l.FilterChains = append(l.FilterChains, &listener.FilterChain{
					FilterChainMatch: &listener.FilterChainMatch{ServerNames: names, TransportProtocol: "tls"},
					Filters:          []*listener.Filter{f},
				})
			}
		}
	case serverTCP:
		for _, vs := range services {
			if vs.tcp == "" || !slices.ContainsFunc(servers, func(s boundServer) bool { return vs.boundTo(s.gw) }) {
				continue
			}
			f, err := tcpProxy(vs.tcp)
			if err != nil {
				return nil, nil, err
			}
			l.FilterChains = []*listener.FilterChain{{Filters: []*listener.Filter{f}}}
			break
		}
	}
	if c := servers[0].srv.class; c == serverHTTPS || c == serverPassthrough {
		insp, err := anypb.New(&tlsinspector.TlsInspector{})
		if err != nil {
			return nil, nil, err
		}
		l.ListenerFilters = []*listener.ListenerFilter{{Name: wellknown.TlsInspector, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: insp}}}
	}
	return l, routes, nil
}

// ParseCredential checks a kubernetes.io/tls Secret's tls.crt and tls.key: PEM, a
// certificate chain whose leaf matches the key.
func ParseCredential(cert, key []byte) error {
	if _, err := tls.X509KeyPair(cert, key); err != nil {
		return fmt.Errorf("tls.crt/tls.key: %w", err)
	}
	return nil
}

var _ types.Resource = (*tlsv3.Secret)(nil)
