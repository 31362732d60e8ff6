package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	fault "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/proto"
)

// Listener is one translated Envoy listener.
type Listener struct {
	Name   string
	Port   uint16
	Chains []*Chain
	// TLS says connections start with a ClientHello that picks the chain (tls_inspector).
	TLS bool
}

// Chain is one filter chain: HTTP through a route table (plaintext or TLS-terminated), or
// TCP to a cluster (plaintext, or TLS passed through).
type Chain struct {
	ServerNames []string // empty: any name (or none)
	Terminate   bool     // TLS terminated here with Secret
	Secret      string   // SDS name of the certificate
	// ClientCA, when set, is the SDS name of the validation context that client
	// certificates must chain to (Istio's MUTUAL): a client without one is refused.
	ClientCA   string
	Route      string // RDS name; "" for TCP chains
	TCPCluster string
	// HTTP limits from the connection manager.
	HeadersTimeout, IdleTimeout time.Duration
	MaxHeaderBytes              int
}

// RouteTable is one translated RouteConfiguration.
type RouteTable struct {
	Name   string
	VHosts []*VHost
}

// VHost is a virtual host.
type VHost struct {
	Name       string
	Domains    []string
	RequireTLS bool
	Routes     []*Route
}

// Route is one route: its match and the weighted clusters it sends to.
type Route struct {
	Name                string
	Prefix, Path, Regex string
	regex               *regexp.Regexp
	Headers             []HeaderMatch
	Clusters            []WeightedCluster
	Timeout             time.Duration // 0: none
}

// HeaderMatch matches one request header: exact, prefix, regex, or present.
type HeaderMatch struct {
	Name                 string
	Exact, Prefix, Regex string
	regex                *regexp.Regexp
	Present              bool
	Invert               bool
}

// WeightedCluster is one destination of a route.
type WeightedCluster struct {
	Name   string
	Weight uint32
}

// Cluster is one translated upstream cluster.
type Cluster struct {
	Name string
	// MTLS: the upstream connection carries the proxy's mesh certificate and verifies the
	// peer against the mesh roots; SNI is the name east-west gateways route on.
	MTLS bool
	SNI  string
}

// errAt names the field at fault.
func errAt(field, format string, args ...any) error {
	return fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...))
}

// TranslateListener translates l, refusing anything the proxy does not implement.
func TranslateListener(l *listener.Listener) (*Listener, error) {
	f := "listener " + l.GetName()
	sa := l.GetAddress().GetSocketAddress()
	if sa == nil || sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
		return nil, errAt(f, "address: want a TCP socket address with a port")
	}
	if l.GetApiListener() != nil || l.GetDefaultFilterChain() != nil || l.GetFilterChainMatcher() != nil || l.GetUseOriginalDst().GetValue() {
		return nil, errAt(f, "api_listener, default_filter_chain, filter_chain_matcher and use_original_dst are not implemented")
	}
	out := &Listener{Name: l.GetName(), Port: uint16(sa.GetPortValue())}
	for i, lf := range l.GetListenerFilters() {
		if lf.GetName() != wellknown.TlsInspector {
			return nil, errAt(f, "listener_filters[%d] %s is not implemented (only tls_inspector)", i, lf.GetName())
		}
		out.TLS = true
	}
	for i, fc := range l.GetFilterChains() {
		c, err := translateChain(fmt.Sprintf("%s filter_chains[%d]", f, i), fc, out.TLS)
		if err != nil {
			return nil, err
		}
		out.Chains = append(out.Chains, c)
	}
	return out, nil
}

func translateChain(f string, fc *listener.FilterChain, inspected bool) (*Chain, error) {
	c := &Chain{}
	if m := fc.GetFilterChainMatch(); m != nil {
		if m.GetDestinationPort() != nil || len(m.GetPrefixRanges()) > 0 || len(m.GetSourcePrefixRanges()) > 0 || len(m.GetSourcePorts()) > 0 ||
			len(m.GetApplicationProtocols()) > 0 || m.GetSourceType() != listener.FilterChainMatch_ANY || len(m.GetDirectSourcePrefixRanges()) > 0 {
			return nil, errAt(f, "filter_chain_match: only server_names and transport_protocol are implemented")
		}
		if tp := m.GetTransportProtocol(); tp != "" && tp != "tls" {
			return nil, errAt(f, "filter_chain_match.transport_protocol %q is not implemented", tp)
		}
		if (len(m.GetServerNames()) > 0 || m.GetTransportProtocol() == "tls") && !inspected {
			return nil, errAt(f, "filter_chain_match on TLS needs the tls_inspector listener filter")
		}
		c.ServerNames = slices.Clone(m.GetServerNames())
	}
	if ts := fc.GetTransportSocket(); ts != nil {
		var d tlsv3.DownstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&d); err != nil {
			return nil, errAt(f, "transport_socket: want a DownstreamTlsContext: %v", err)
		}
		cc := d.GetCommonTlsContext()
		if len(cc.GetTlsCertificates()) > 0 || len(cc.GetTlsCertificateSdsSecretConfigs()) != 1 || cc.GetTlsCertificateProviderInstance() != nil {
			return nil, errAt(f, "transport_socket: only one SDS server certificate is implemented (no inline certificates)")
		}
		if vc := cc.GetValidationContextType(); vc != nil || d.GetRequireClientCertificate().GetValue() {
			// Client certificates: required, and verified against a CA delivered over SDS
			// (a combined validation context with an empty default), as Istio's MUTUAL.
			comb := cc.GetCombinedValidationContext()
			vsds := comb.GetValidationContextSdsSecretConfig()
			if !d.GetRequireClientCertificate().GetValue() || comb == nil || vsds.GetName() == "" ||
				(comb.GetDefaultValidationContext() != nil && !proto.Equal(comb.GetDefaultValidationContext(), &tlsv3.CertificateValidationContext{})) {
				return nil, errAt(f, "transport_socket: client certificates are implemented only as required and verified against an SDS validation context (combined_validation_context with an empty default)")
			}
			if vsds.GetSdsConfig().GetAds() == nil {
				return nil, errAt(f, "transport_socket: SDS validation context %s must come over ADS", vsds.GetName())
			}
			c.ClientCA = vsds.GetName()
		}
		sds := cc.GetTlsCertificateSdsSecretConfigs()[0]
		if sds.GetSdsConfig().GetAds() == nil {
			return nil, errAt(f, "transport_socket: SDS secret %s must come over ADS", sds.GetName())
		}
		c.Terminate, c.Secret = true, sds.GetName()
	}
	if len(fc.GetFilters()) != 1 {
		return nil, errAt(f, "filters: want exactly one (http_connection_manager or tcp_proxy), got %d", len(fc.GetFilters()))
	}
	filter := fc.GetFilters()[0]
	switch filter.GetName() {
	case wellknown.HTTPConnectionManager:
		var m hcm.HttpConnectionManager
		if err := filter.GetTypedConfig().UnmarshalTo(&m); err != nil {
			return nil, errAt(f, "http_connection_manager: %v", err)
		}
		if m.GetRds() == nil || m.GetRds().GetConfigSource().GetAds() == nil {
			return nil, errAt(f, "http_connection_manager: only routes by RDS over ADS are implemented")
		}
		for i, hf := range m.GetHttpFilters() {
			switch hf.GetName() {
			case wellknown.Router:
			case wellknown.Fault:
				var fl fault.HTTPFault
				if err := hf.GetTypedConfig().UnmarshalTo(&fl); err != nil || !proto.Equal(&fl, &fault.HTTPFault{}) {
					return nil, errAt(f, "http_filters[%d]: fault injection is not implemented (only the empty filter routes override)", i)
				}
			default:
				return nil, errAt(f, "http_filters[%d] %s is not implemented", i, hf.GetName())
			}
		}
		c.Route = m.GetRds().GetRouteConfigName()
		c.HeadersTimeout = m.GetRequestHeadersTimeout().AsDuration()
		c.IdleTimeout = m.GetCommonHttpProtocolOptions().GetIdleTimeout().AsDuration()
		c.MaxHeaderBytes = int(m.GetMaxRequestHeadersKb().GetValue()) * 1024
	case wellknown.TCPProxy:
		var tp tcpproxy.TcpProxy
		if err := filter.GetTypedConfig().UnmarshalTo(&tp); err != nil {
			return nil, errAt(f, "tcp_proxy: %v", err)
		}
		if tp.GetCluster() == "" {
			return nil, errAt(f, "tcp_proxy: only a single cluster is implemented")
		}
		if c.Terminate {
			return nil, errAt(f, "tcp_proxy behind TLS termination is not implemented")
		}
		c.TCPCluster = tp.GetCluster()
	default:
		return nil, errAt(f, "filters[0] %s is not implemented", filter.GetName())
	}
	return c, nil
}

// TranslateValidationContext translates an SDS validation-context secret: the CA pool
// client certificates must chain to.
func TranslateValidationContext(s *tlsv3.Secret) (*x509.CertPool, error) {
	f := "secret " + s.GetName()
	vc := s.GetValidationContext()
	ca := vc.GetTrustedCa().GetInlineBytes()
	if vc == nil || ca == nil {
		return nil, errAt(f, "only validation_context with an inline_bytes trusted_ca is implemented")
	}
	if len(vc.GetMatchTypedSubjectAltNames()) > 0 || len(vc.GetVerifyCertificateHash()) > 0 || len(vc.GetVerifyCertificateSpki()) > 0 || vc.GetCrl() != nil {
		return nil, errAt(f, "validation_context: subject alt names, pins and CRLs are not implemented")
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, errAt(f, "validation_context.trusted_ca holds no PEM certificate")
	}
	return pool, nil
}

// TranslateRoutes translates a route configuration.
func TranslateRoutes(rc *route.RouteConfiguration) (*RouteTable, error) {
	f := "route " + rc.GetName()
	t := &RouteTable{Name: rc.GetName()}
	for i, vh := range rc.GetVirtualHosts() {
		vf := fmt.Sprintf("%s virtual_hosts[%d]", f, i)
		if len(vh.GetDomains()) == 0 {
			return nil, errAt(vf, "domains: at least one is required")
		}
		v := &VHost{Name: vh.GetName(), Domains: slices.Clone(vh.GetDomains())}
		switch vh.GetRequireTls() {
		case route.VirtualHost_NONE:
		case route.VirtualHost_ALL:
			v.RequireTLS = true
		default:
			return nil, errAt(vf, "require_tls %s is not implemented", vh.GetRequireTls())
		}
		if len(vh.GetTypedPerFilterConfig()) > 0 || vh.GetRetryPolicy() != nil || vh.GetCors() != nil || len(vh.GetRequestHeadersToAdd()) > 0 {
			return nil, errAt(vf, "per-filter config, retry_policy, cors and header rewrites are not implemented")
		}
		for j, r := range vh.GetRoutes() {
			tr, err := translateRoute(fmt.Sprintf("%s routes[%d]", vf, j), r)
			if err != nil {
				return nil, err
			}
			v.Routes = append(v.Routes, tr)
		}
		t.VHosts = append(t.VHosts, v)
	}
	return t, nil
}

func translateRoute(f string, r *route.Route) (*Route, error) {
	out := &Route{Name: r.GetName()}
	m := r.GetMatch()
	if m.GetCaseSensitive() != nil && !m.GetCaseSensitive().GetValue() {
		return nil, errAt(f, "match.case_sensitive false is not implemented")
	}
	if len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil || m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 {
		return nil, errAt(f, "match: query_parameters, grpc, runtime_fraction, tls_context and dynamic_metadata are not implemented")
	}
	switch p := m.GetPathSpecifier().(type) {
	case *route.RouteMatch_Prefix:
		out.Prefix = p.Prefix
	case *route.RouteMatch_Path:
		out.Path = p.Path
	case *route.RouteMatch_SafeRegex:
		re, err := regexp.Compile("^(?:" + p.SafeRegex.GetRegex() + ")$")
		if err != nil {
			return nil, errAt(f, "match.safe_regex: %v", err)
		}
		out.Regex, out.regex = p.SafeRegex.GetRegex(), re
	default:
		return nil, errAt(f, "match: only prefix, path and safe_regex are implemented")
	}
	for i, h := range m.GetHeaders() {
		hm := HeaderMatch{Name: strings.ToLower(h.GetName()), Invert: h.GetInvertMatch()}
		hf := fmt.Sprintf("%s match.headers[%d]", f, i)
		switch s := h.GetHeaderMatchSpecifier().(type) {
		case *route.HeaderMatcher_PresentMatch:
			hm.Present = s.PresentMatch
		case *route.HeaderMatcher_StringMatch:
			sm := s.StringMatch
			if sm.GetIgnoreCase() {
				return nil, errAt(hf, "ignore_case is not implemented")
			}
			switch {
			case sm.GetExact() != "" || (sm.GetPrefix() == "" && sm.GetSafeRegex() == nil && sm.GetSuffix() == "" && sm.GetContains() == ""):
				hm.Exact = sm.GetExact()
			case sm.GetPrefix() != "":
				hm.Prefix = sm.GetPrefix()
			case sm.GetSafeRegex() != nil:
				re, err := regexp.Compile("^(?:" + sm.GetSafeRegex().GetRegex() + ")$")
				if err != nil {
					return nil, errAt(hf, "safe_regex: %v", err)
				}
				hm.Regex, hm.regex = sm.GetSafeRegex().GetRegex(), re
			default:
				return nil, errAt(hf, "only exact, prefix and safe_regex are implemented")
			}
		default:
			return nil, errAt(hf, "only string_match and present_match are implemented")
		}
		out.Headers = append(out.Headers, hm)
	}
	if len(r.GetTypedPerFilterConfig()) > 0 {
		return nil, errAt(f, "typed_per_filter_config (fault injection) is not implemented")
	}
	if len(r.GetRequestHeadersToAdd()) > 0 || len(r.GetResponseHeadersToAdd()) > 0 || len(r.GetRequestHeadersToRemove()) > 0 {
		return nil, errAt(f, "header rewrites are not implemented")
	}
	ra := r.GetRoute()
	if ra == nil {
		return nil, errAt(f, "only route actions are implemented (not redirect, direct_response)")
	}
	if ra.GetRetryPolicy().GetNumRetries().GetValue() > 0 || len(ra.GetRequestMirrorPolicies()) > 0 || ra.GetPrefixRewrite() != "" || ra.GetRegexRewrite() != nil ||
		ra.GetHostRewriteSpecifier() != nil || ra.GetCors() != nil {
		return nil, errAt(f, "route: retries, mirrors, rewrites and cors are not implemented")
	}
	out.Timeout = ra.GetTimeout().AsDuration()
	switch cs := ra.GetClusterSpecifier().(type) {
	case *route.RouteAction_Cluster:
		out.Clusters = []WeightedCluster{{Name: cs.Cluster, Weight: 1}}
	case *route.RouteAction_WeightedClusters:
		for _, w := range cs.WeightedClusters.GetClusters() {
			if w.GetWeight().GetValue() > 0 {
				out.Clusters = append(out.Clusters, WeightedCluster{Name: w.GetName(), Weight: w.GetWeight().GetValue()})
			}
		}
		if len(out.Clusters) == 0 {
			return nil, errAt(f, "weighted_clusters: no cluster has weight")
		}
	default:
		return nil, errAt(f, "route: only cluster and weighted_clusters are implemented")
	}
	return out, nil
}

// TranslateCluster translates an EDS cluster. Its load-balancing policy and circuit
// breakers are not acted on (round robin over healthy endpoints); docs/proxy.md says so.
func TranslateCluster(c *cluster.Cluster) (*Cluster, error) {
	f := "cluster " + c.GetName()
	if c.GetType() != cluster.Cluster_EDS || c.GetEdsClusterConfig().GetEdsConfig().GetAds() == nil {
		return nil, errAt(f, "only EDS clusters over ADS are implemented")
	}
	out := &Cluster{Name: c.GetName()}
	if ts := c.GetTransportSocket(); ts != nil {
		var u tlsv3.UpstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&u); err != nil {
			return nil, errAt(f, "transport_socket: want an UpstreamTlsContext: %v", err)
		}
		cc := u.GetCommonTlsContext()
		sds := cc.GetTlsCertificateSdsSecretConfigs()
		if len(sds) != 1 || sds[0].GetName() != "default" || cc.GetValidationContextSdsSecretConfig().GetName() != "ROOTCA" {
			return nil, errAt(f, "transport_socket: only the mesh identity (SDS default, ROOTCA) is implemented")
		}
		out.MTLS, out.SNI = true, u.GetSni()
	}
	return out, nil
}

// Endpoints returns the usable endpoints of a load assignment: not unhealthy, draining or
// timed out, of the lowest priority that has any.
func Endpoints(cla *endpoint.ClusterLoadAssignment) []netip.AddrPort {
	byPrio := map[uint32][]netip.AddrPort{}
	for _, loc := range cla.GetEndpoints() {
		for _, le := range loc.GetLbEndpoints() {
			switch le.GetHealthStatus() {
			case core.HealthStatus_UNHEALTHY, core.HealthStatus_DRAINING, core.HealthStatus_TIMEOUT:
				continue
			}
			sa := le.GetEndpoint().GetAddress().GetSocketAddress()
			ip, err := netip.ParseAddr(sa.GetAddress())
			if err != nil || sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
				continue
			}
			byPrio[loc.GetPriority()] = append(byPrio[loc.GetPriority()], netip.AddrPortFrom(ip, uint16(sa.GetPortValue())))
		}
	}
	if len(byPrio) == 0 {
		return nil
	}
	lowest := uint32(1 << 31)
	for p := range byPrio {
		lowest = min(lowest, p)
	}
	return byPrio[lowest]
}

// TranslateSecret turns an SDS TLS certificate into a tls.Certificate.
func TranslateSecret(s *tlsv3.Secret) (*tls.Certificate, error) {
	f := "secret " + s.GetName()
	tc := s.GetTlsCertificate()
	chain, key := tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes()
	if tc == nil || chain == nil || key == nil {
		return nil, errAt(f, "only tls_certificate with inline_bytes chain and key is implemented")
	}
	cert, err := tls.X509KeyPair(chain, key)
	if err != nil {
		return nil, errAt(f, "%v", err)
	}
	return &cert, nil
}
