package primary

import (
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbacfilter "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	origdst "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// SidecarInboundPort is where an Envoy sidecar's redirected inbound traffic arrives
// (Istio's virtualInbound port).
const SidecarInboundPort = 15006

// BuildSidecarInbound translates the security configuration of v into the inbound side of
// Envoy sidecars on key's network: one "virtualInbound" listener on SidecarInboundPort
// (original destination and TLS inspector listener filters) with, per HTTP-family port of
// every mTLS-ready pod that is not an xDS-enabled gRPC server, a filter chain matched on
// the pod's address, the port and TLS: mTLS with the workload certificate and roots over
// SDS and a required client certificate, then an HttpConnectionManager with the same RBAC
// filters proxyless servers get (deny, then allow) and the router to "inbound|<port>||",
// the application on 127.0.0.1. A port that is not STRICT also gets a plaintext chain
// (PERMISSIVE: Envoy, unlike grpc-go, tells TLS from plaintext).
//
// It is pure, and the primary does not serve its output yet: every sidecar of a network
// shares one view, and a listener holding every pod's chains would grow and change with
// every endpoint of the network. The translation is validated and golden-tested so the
// semantics match the proxyless servers' when sidecar views become per workload.
func BuildSidecarInbound(v *View, key ViewKey) (Resources, error) {
	sp := planSecurity(v)
	res := Resources{}
	if !sp.known {
		return res, nil
	}
	insp, err := anypb.New(&tlsinspector.TlsInspector{})
	if err != nil {
		return nil, err
	}
	od, err := anypb.New(&origdst.OriginalDst{})
	if err != nil {
		return nil, err
	}
	l := &listener.Listener{
		Name:    "virtualInbound",
		Address: socketAddress("0.0.0.0", SidecarInboundPort),
		ListenerFilters: []*listener.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst", ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: od}},
			{Name: wellknown.TlsInspector, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: insp}},
		},
	}
	ports := map[uint16]bool{}
	seen := map[netip.AddrPort]bool{}
	for _, svc := range v.Services {
		for _, ep := range svc.Endpoints {
			if !ep.MTLSReady || ep.Labels[LabelXDSServer] == "true" || ep.Network != key.Network {
				continue
			}
			for _, p := range ep.Ports {
				addr := netip.AddrPortFrom(ep.Address, p.Number)
				if !isHTTP(p.Protocol) || seen[addr] {
					continue
				}
				seen[addr] = true
				deny, allow := rbacFor(sp.authz, svc.Key.Namespace, ep.Labels)
				deny = sp.fed.denyPeers(deny, svc.Key)
				strict := sp.strict(svc.Key.Namespace, ep.Labels, uint32(p.Number))
				chains, err := sidecarInboundChains(addr, strict, deny, allow)
				if err != nil {
					return nil, err
				}
				l.FilterChains = append(l.FilterChains, chains...)
				ports[p.Number] = true
			}
		}
	}
	if len(l.FilterChains) == 0 {
		return res, nil
	}
	res[resource.ListenerType] = []types.Resource{l}
	for _, port := range slices.Sorted(maps.Keys(ports)) {
		res[resource.ClusterType] = append(res[resource.ClusterType], inboundCluster(port))
	}
	return res, nil
}

// sidecarInboundChains are one workload port's filter chains: mTLS, and plaintext unless
// strict.
func sidecarInboundChains(addr netip.AddrPort, strict bool, deny, allow *rbacv3.RBAC) ([]*listener.FilterChain, error) {
	bits := uint32(32)
	if addr.Addr().Is6() {
		bits = 128
	}
	name := "inbound|" + strconv.Itoa(int(addr.Port())) + "||"
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
	m := &hcm.HttpConnectionManager{
		StatPrefix: "inbound_" + addr.String(),
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: name,
			VirtualHosts: []*route.VirtualHost{{Name: name, Domains: []string{"*"}, Routes: []*route.Route{{
				Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
				Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: name}}},
			}}}},
		}},
		HttpFilters: filters,
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, err
	}
	chain := func(tp string) *listener.FilterChain {
		return &listener.FilterChain{
			Name: name + tp,
			FilterChainMatch: &listener.FilterChainMatch{
				PrefixRanges:      []*core.CidrRange{{AddressPrefix: addr.Addr().String(), PrefixLen: wrapperspb.UInt32(bits)}},
				DestinationPort:   wrapperspb.UInt32(uint32(addr.Port())),
				TransportProtocol: tp,
			},
			Filters: []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: a}}},
		}
	}
	tlsChain := chain("tls")
	if tlsChain.TransportSocket, err = envoyDownstreamTLS(); err != nil {
		return nil, err
	}
	out := []*listener.FilterChain{tlsChain}
	if !strict {
		out = append(out, chain("raw_buffer"))
	}
	return out, nil
}

// envoyDownstreamTLS is the server side of envoyUpstreamTLS: certificate and roots over
// SDS from the workload's agent, and a client certificate required.
func envoyDownstreamTLS() (*core.TransportSocket, error) {
	up, err := envoyUpstreamTLS("")
	if err != nil {
		return nil, err
	}
	uc := &tlsv3.UpstreamTlsContext{}
	if err := up.GetTypedConfig().UnmarshalTo(uc); err != nil {
		return nil, err
	}
	a, err := anypb.New(&tlsv3.DownstreamTlsContext{RequireClientCertificate: wrapperspb.Bool(true), CommonTlsContext: uc.GetCommonTlsContext()})
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}

// inboundCluster is the application behind a sidecar: 127.0.0.1:<port>.
func inboundCluster(port uint16) *cluster.Cluster {
	name := "inbound|" + strconv.Itoa(int(port)) + "||"
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LoadAssignment: &endpoint.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpoint.LocalityLbEndpoints{{
			LbEndpoints: []*endpoint.LbEndpoint{{HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
				Address: socketAddress("127.0.0.1", uint32(port)),
			}}}},
		}}},
	}
}
