package primary

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	tlsinspector "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// ClusterName returns the Istio-style name of a service port's cluster,
// "outbound|<port>|<subset>|<host>".
func ClusterName(port uint16, subset string, host mesh.Hostname) string {
	return "outbound|" + strconv.Itoa(int(port)) + "|" + subset + "|" + string(host)
}

// GRPCListenerName is the name a proxyless gRPC client asks for when it dials
// xds:///<host>:<port>.
func GRPCListenerName(host mesh.Hostname, port uint16) string {
	return string(host) + ":" + strconv.Itoa(int(port))
}

// Resources is one view's xDS resources by type URL.
type Resources map[resource.Type][]types.Resource

// BuildResources translates a registry view into the resources of one proxy view. It is a
// pure function: the same view and key always give the same resources, in a stable order.
func BuildResources(v *View, key ViewKey) (Resources, error) {
	return NewBuilder().Build(v, key)
}

// Builder builds views like BuildResources, remembering each service's resources per view
// so that a push rebuilds (and the cache re-marshals) only services whose generation
// changed. Not safe for concurrent use.
type Builder struct {
	memo map[ViewKey]map[mesh.Hostname]*serviceResources
}

// NewBuilder returns an empty builder.
func NewBuilder() *Builder { return &Builder{memo: map[ViewKey]map[mesh.Hostname]*serviceResources{}} }

// serviceResources are one service's resources in one view.
type serviceResources struct {
	gen, gwGen uint64
	clusters   []types.Resource
	endpoints  []types.Resource
	listeners  []types.Resource
	vhosts     map[uint16]*route.VirtualHost // sidecar routes by port
	snis       []string                      // gateway server names (= sni-dnat cluster names)
}

// Build returns the resources of view key for v.
func (b *Builder) Build(v *View, key ViewKey) (Resources, error) {
	old := b.memo[key]
	next := make(map[mesh.Hostname]*serviceResources, len(v.Services))
	res := Resources{}
	routesByPort := map[uint16][]*route.VirtualHost{}
	for _, svc := range v.Services {
		sr := old[svc.Hostname]
		if sr == nil || sr.gen != svc.Gen || sr.gwGen != v.GatewaysGen {
			var err error
			if sr, err = buildService(svc, key, v.Gateways); err != nil {
				return nil, err
			}
			sr.gen, sr.gwGen = svc.Gen, v.GatewaysGen
		}
		next[svc.Hostname] = sr
		res[resource.ClusterType] = append(res[resource.ClusterType], sr.clusters...)
		res[resource.EndpointType] = append(res[resource.EndpointType], sr.endpoints...)
		res[resource.ListenerType] = append(res[resource.ListenerType], sr.listeners...)
		for port, vh := range sr.vhosts {
			routesByPort[port] = append(routesByPort[port], vh)
		}
	}
	b.memo[key] = next
	if key.Kind == ProxyGateway {
		var snis []string
		for _, svc := range v.Services {
			snis = append(snis, next[svc.Hostname].snis...)
		}
		l, err := gatewayListener(snis)
		if err != nil {
			return nil, err
		}
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	ports := make([]uint16, 0, len(routesByPort))
	for port := range routesByPort {
		ports = append(ports, port)
	}
	slices.Sort(ports)
	for _, port := range ports {
		name := strconv.Itoa(int(port))
		res[resource.RouteType] = append(res[resource.RouteType], &route.RouteConfiguration{Name: name, VirtualHosts: routesByPort[port]})
		l, err := sidecarListener(port, name)
		if err != nil {
			return nil, err
		}
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	return res, nil
}

// buildService makes one service's resources for one view.
func buildService(svc *MergedService, key ViewKey, gateways map[mesh.NetworkID][]Gateway) (*serviceResources, error) {
	sr := &serviceResources{}
	localOnly := key.Kind == ProxyGateway
	mtls := key.Kind != ProxyGateway && slices.ContainsFunc(svc.Endpoints, func(e mesh.Endpoint) bool { return e.MTLSReady })
	for _, p := range svc.Ports {
		name := ClusterName(p.Port, "", svc.Hostname)
		c := edsCluster(name)
		if mtls {
			upstream := grpcUpstreamTLS
			if key.Kind == ProxySidecar {
				upstream = envoyUpstreamTLS
			}
			ts, err := upstream(sniFor(p.Port, svc.Hostname))
			if err != nil {
				return nil, err
			}
			c.TransportSocket = ts
		}
		sr.clusters = append(sr.clusters, c)
		local := splitHorizon(svc.Endpoints, p.Name, key.Network, gateways, localOnly)
		sr.endpoints = append(sr.endpoints, loadAssignment(name, local))
		if key.Kind == ProxyGateway {
			// An Envoy-based gateway routes by SNI to an "sni-dnat" cluster named like
			// the server name itself, with this network's endpoints.
			sni := sniFor(p.Port, svc.Hostname)
			sr.clusters = append(sr.clusters, edsCluster(sni))
			sr.endpoints = append(sr.endpoints, loadAssignment(sni, local))
			sr.snis = append(sr.snis, sni)
		}
		switch key.Kind {
		case ProxyGRPC:
			l, err := grpcListener(svc.Hostname, p.Port, name)
			if err != nil {
				return nil, err
			}
			sr.listeners = append(sr.listeners, l)
		case ProxySidecar:
			if isHTTP(p.Protocol) {
				if sr.vhosts == nil {
					sr.vhosts = map[uint16]*route.VirtualHost{}
				}
				sr.vhosts[p.Port] = virtualHost(svc.Hostname, p.Port, name)
			}
		}
	}
	return sr, nil
}

// Validate runs every resource's own proto validation (the checks Envoy applies),
// including the typed configs nested in Any fields (filters, transport sockets, the
// api_listener), which ValidateAll alone does not open.
func (r Resources) Validate() error {
	for typ, list := range r {
		for _, x := range list {
			if err := validateDeep(x.ProtoReflect()); err != nil {
				return fmt.Errorf("primary: invalid %s %q: %w", typ, cache.GetResourceName(x), err)
			}
		}
	}
	return nil
}

// validateDeep validates m and every message inside it, unpacking Any values.
func validateDeep(m protoreflect.Message) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("typed config %s: %w", a.GetTypeUrl(), err)
		}
		return validateDeep(inner.ProtoReflect())
	}
	if v, ok := m.Interface().(interface{ ValidateAll() error }); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, val protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			l := val.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = validateDeep(l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Kind() == protoreflect.MessageKind:
			val.Map().Range(func(_ protoreflect.MapKey, v protoreflect.Value) bool {
				err = validateDeep(v.Message())
				return err == nil
			})
		case !fd.IsList() && !fd.IsMap() && fd.Kind() == protoreflect.MessageKind:
			err = validateDeep(val.Message())
		}
		return err == nil
	})
	return err
}

// Snapshot wraps the resources in a go-control-plane snapshot at version.
func (r Resources) Snapshot(version string) (*cache.Snapshot, error) {
	return cache.NewSnapshot(version, r)
}

func isHTTP(p mesh.Protocol) bool {
	return p == mesh.ProtocolHTTP || p == mesh.ProtocolHTTP2 || p == mesh.ProtocolGRPC
}

func adsSource() *core.ConfigSource {
	return &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
}

func edsCluster(name string) *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig:     &cluster.Cluster_EdsClusterConfig{EdsConfig: adsSource()},
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
	}
}

// loadAssignment groups endpoints by locality. Every locality carries a load-balancing
// weight (the sum of its endpoints' weights): proxyless gRPC ignores localities without one
// and then fails every call.
func loadAssignment(name string, eps []lbEndpoint) *endpoint.ClusterLoadAssignment {
	byLoc := map[mesh.Locality][]lbEndpoint{}
	for _, e := range eps {
		byLoc[e.Locality] = append(byLoc[e.Locality], e)
	}
	locs := make([]mesh.Locality, 0, len(byLoc))
	for l := range byLoc {
		locs = append(locs, l)
	}
	slices.SortFunc(locs, func(a, b mesh.Locality) int { return cmp.Compare(a.String(), b.String()) })
	cla := &endpoint.ClusterLoadAssignment{ClusterName: name}
	for _, l := range locs {
		group := &endpoint.LocalityLbEndpoints{Locality: &core.Locality{Region: l.Region, Zone: l.Zone, SubZone: l.Subzone}}
		var sum uint32
		for _, e := range byLoc[l] {
			sum += e.Weight
			group.LbEndpoints = append(group.LbEndpoints, &endpoint.LbEndpoint{
				HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
					Address: socketAddress(e.Addr.Addr().String(), uint32(e.Addr.Port())),
				}},
				HealthStatus:        healthStatus(e.Health),
				LoadBalancingWeight: wrapperspb.UInt32(e.Weight),
			})
		}
		group.LoadBalancingWeight = wrapperspb.UInt32(sum)
		cla.Endpoints = append(cla.Endpoints, group)
	}
	return cla
}

func healthStatus(h mesh.Health) core.HealthStatus {
	switch h {
	case mesh.HealthHealthy:
		return core.HealthStatus_HEALTHY
	case mesh.HealthUnhealthy:
		return core.HealthStatus_UNHEALTHY
	case mesh.HealthDraining:
		return core.HealthStatus_DRAINING
	default:
		return core.HealthStatus_UNKNOWN
	}
}

func socketAddress(addr string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol: core.SocketAddress_TCP, Address: addr, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

func virtualHost(host mesh.Hostname, port uint16, clusterName string) *route.VirtualHost {
	hp := string(host) + ":" + strconv.Itoa(int(port))
	return &route.VirtualHost{
		Name:    hp,
		Domains: []string{string(host), hp},
		Routes: []*route.Route{{
			Match:  &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
			Action: &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName}}},
		}},
	}
}

func routerFilter() (*hcm.HttpFilter, error) {
	r, err := anypb.New(&router.Router{})
	if err != nil {
		return nil, err
	}
	return &hcm.HttpFilter{Name: wellknown.Router, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: r}}, nil
}

// grpcListener is the api_listener a proxyless gRPC client resolves xds:///host:port to:
// an HttpConnectionManager with the router filter and an inline route to the cluster.
func grpcListener(host mesh.Hostname, port uint16, clusterName string) (*listener.Listener, error) {
	rf, err := routerFilter()
	if err != nil {
		return nil, err
	}
	name := GRPCListenerName(host, port)
	m := &hcm.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name:         name,
			VirtualHosts: []*route.VirtualHost{virtualHost(host, port, clusterName)},
		}},
		HttpFilters: []*hcm.HttpFilter{rf},
	}
	// grpc-go matches the dialled authority against the domains; accept any spelling.
	m.GetRouteConfig().VirtualHosts[0].Domains = []string{"*"}
	a, err := anypb.New(m)
	if err != nil {
		return nil, err
	}
	return &listener.Listener{Name: name, ApiListener: &listener.ApiListener{ApiListener: a}}, nil
}

// sidecarListener is an Envoy outbound listener for one port, routing by Host header
// through the RDS route configuration named after the port.
func sidecarListener(port uint16, routeName string) (*listener.Listener, error) {
	rf, err := routerFilter()
	if err != nil {
		return nil, err
	}
	m := &hcm.HttpConnectionManager{
		StatPrefix: "outbound_0.0.0.0_" + routeName,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			ConfigSource: adsSource(), RouteConfigName: routeName,
		}},
		HttpFilters: []*hcm.HttpFilter{rf},
	}
	a, err := anypb.New(m)
	if err != nil {
		return nil, err
	}
	return &listener.Listener{
		Name:    "0.0.0.0_" + routeName,
		Address: socketAddress("0.0.0.0", uint32(port)),
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: a}}},
		}},
	}, nil
}

// Names of the certificate provider instance and certificates a proxyless gRPC client's
// bootstrap must define (file_watcher provider) for mTLS.
const (
	CertProviderInstance = "default"
	IdentityCertName     = "default"
	RootCertName         = "ROOTCA"
)

// sniFor is the server name for a service port across networks,
// outbound_.<port>_._.<hostname>: east-west gateways route on it.
func sniFor(port uint16, host mesh.Hostname) string {
	return "outbound_." + strconv.Itoa(int(port)) + "_._." + string(host)
}

// grpcUpstreamTLS is the mTLS transport socket of a proxyless gRPC cluster: identity and
// roots from the bootstrap's certificate provider, and the SNI an east-west gateway routes
// on (grpc-go sends it when GRPC_EXPERIMENTAL_XDS_SNI=true).
func grpcUpstreamTLS(sni string) (*core.TransportSocket, error) {
	ctx := &tlsv3.UpstreamTlsContext{
		Sni: sni,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: IdentityCertName},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: CertProviderInstance, CertificateName: RootCertName},
			}},
		},
	}
	a, err := anypb.New(ctx)
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}

// SDSCluster is the cluster through which an Envoy sidecar reaches its agent's SDS server
// (Istio's name; the bootstrap defines it as the agent's Unix socket).
const SDSCluster = "sds-grpc"

// envoyUpstreamTLS is the mTLS transport socket of an Envoy sidecar's cluster: the
// workload certificate ("default") and the roots ("ROOTCA") come over SDS from the
// workload's agent and are rotated there, and the SNI lets east-west gateways route.
func envoyUpstreamTLS(sni string) (*core.TransportSocket, error) {
	source := &core.ConfigSource{
		ResourceApiVersion: core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_ApiConfigSource{ApiConfigSource: &core.ApiConfigSource{
			ApiType:             core.ApiConfigSource_GRPC,
			TransportApiVersion: core.ApiVersion_V3,
			GrpcServices: []*core.GrpcService{{TargetSpecifier: &core.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: SDSCluster}}}},
		}},
	}
	ctx := &tlsv3.UpstreamTlsContext{
		Sni: sni,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: trust.SDSIdentitySecret, SdsConfig: source}},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: trust.SDSRootSecret, SdsConfig: source}},
		},
	}
	a, err := anypb.New(ctx)
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}

// GatewayPort is where east-west gateways take cross-network mTLS.
const GatewayPort = 15443

// gatewayListener is the Envoy east-west gateway's listener (AUTO_PASSTHROUGH): the TLS
// inspector reads the SNI, and one filter chain per server name proxies the still
// encrypted stream to the sni-dnat cluster of that name. Unknown names match no chain and
// are closed.
func gatewayListener(snis []string) (*listener.Listener, error) {
	insp, err := anypb.New(&tlsinspector.TlsInspector{})
	if err != nil {
		return nil, err
	}
	l := &listener.Listener{
		Name:            "0.0.0.0_" + strconv.Itoa(GatewayPort),
		Address:         socketAddress("0.0.0.0", GatewayPort),
		ListenerFilters: []*listener.ListenerFilter{{Name: wellknown.TlsInspector, ConfigType: &listener.ListenerFilter_TypedConfig{TypedConfig: insp}}},
	}
	for _, sni := range snis {
		tp, err := anypb.New(&tcpproxy.TcpProxy{StatPrefix: sni, ClusterSpecifier: &tcpproxy.TcpProxy_Cluster{Cluster: sni}})
		if err != nil {
			return nil, err
		}
		l.FilterChains = append(l.FilterChains, &listener.FilterChain{
			FilterChainMatch: &listener.FilterChainMatch{ServerNames: []string{sni}, TransportProtocol: "tls"},
			Filters:          []*listener.Filter{{Name: wellknown.TCPProxy, ConfigType: &listener.Filter_TypedConfig{TypedConfig: tp}}},
		})
	}
	return l, nil
}
