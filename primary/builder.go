package primary

import (
	"cmp"
	"fmt"
	"maps"
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
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// GRPCListenerName is the name a proxyless gRPC client asks for when it dials
// xds:///<host>:<port>: grpc-go requests the dialled target as the Listener name, so
// the name is the authority exactly as clients write it.
func GRPCListenerName(host mesh.Hostname, port uint16) string {
	return string(host) + ":" + strconv.Itoa(int(port))
}

// Resources is one view's xDS resources by type URL. Within a type, resources are in a
// stable order (services by hostname, then port), so equal inputs give equal slices.
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
	// plans are the traffic plans of the view at planVersion (planTrafficSet), one per
	// visibility signature, shared by every view key built from one registry view.
	plans       *trafficPlans
	planVersion uint64
	// shared holds, when there are several traffic plans, the newest resources of each
	// service per view key without namespace, for plans that plan it alike.
	shared map[ViewKey]map[mesh.Hostname]*serviceResources
	// sec is the security plan and the inbound listeners' memo (inbound.go).
	sec *securityState
}

// NewBuilder returns an empty builder.
func NewBuilder() *Builder {
	return &Builder{memo: map[ViewKey]map[mesh.Hostname]*serviceResources{}, shared: map[ViewKey]map[mesh.Hostname]*serviceResources{}}
}

// serviceResources are one service's resources in one view.
type serviceResources struct {
	gen, gwGen uint64
	planKey    string // the hostPlan key it was built with
	clusters   []types.Resource
	endpoints  []types.Resource
	listeners  []types.Resource
	vhosts     map[uint16]*route.VirtualHost // sidecar routes by port
	snis       []string                      // gateway server names (= sni-dnat cluster names)
}

// Build returns the resources of view key for v: per service port an EDS cluster and
// its load assignment (split horizon for key's network), and by proxy kind an
// api_listener per port (proxyless gRPC), outbound listeners and one route configuration
// per HTTP-family port (Envoy sidecar), or sni-dnat clusters and the 15443
// AUTO_PASSTHROUGH listener (gateway). Services whose generation and the gateways' are
// unchanged since the last Build of key reuse their resources (the same pointers, which
// the view cache then does not marshal again).
//
// A Sidecar that applies to key's namespace (or, with key.Workload, the Sidecar with
// workloadSelector it names) leaves out the services its egress hosts do not admit
// (sidecarscope.go), and the namespace's visibility signature picks its traffic
// plan (exportTo, exportto.go): keys that differ only by namespace and see the same
// objects share one memo, which keeps the resources of services another namespace's view
// left out; a service planned alike in the public plan reuses that plan's resources.
func (b *Builder) Build(v *View, key ViewKey) (Resources, error) {
	if key.Kind == ProxyIngress {
		return b.buildIngress(v, key) // ingress.go
	}
	plans := b.trafficPlansFor(v)
	plan, sig := plans.forNamespace(key.Namespace)
	memoKey := key
	memoKey.Namespace, memoKey.Workload = "", "" // scoping only filters memoised services
	// With several plans, services planned alike in several of them are shared through
	// b.shared: the newest resources of each service for this kind, network and locality.
	var shared map[mesh.Hostname]*serviceResources
	if len(plans.bySig) > 1 {
		if shared = b.shared[memoKey]; shared == nil {
			shared = map[mesh.Hostname]*serviceResources{}
			b.shared[memoKey] = shared
		}
		if len(shared) > 2*len(v.Services) { // drop services gone from the view
			maps.DeleteFunc(shared, func(h mesh.Hostname, _ *serviceResources) bool { return v.Service(h) == nil })
		}
	}
	if sig != "" {
		// Not a namespace name (those are DNS labels): the memo of every namespace with
		// this visibility signature.
		memoKey.Namespace = "exportTo:" + sig
	}
	old := b.memo[memoKey]
	var admitted map[mesh.Hostname]bool // nil: every service
	if key.Kind != ProxyGateway {
		if sc := plan.sidecars.scopeForKey(key.Namespace, key.Workload); sc != nil {
			admitted = sc.admitted(v, plan, key.Namespace)
		}
	}
	next := make(map[mesh.Hostname]*serviceResources, len(v.Services))
	res := Resources{}
	routesByPort := map[uint16][]*route.VirtualHost{}
	for _, svc := range v.Services {
		sr := old[svc.Hostname]
		if (admitted != nil && !admitted[svc.Hostname]) || plan.hidden[svc.Hostname] {
			if sr != nil {
				next[svc.Hostname] = sr // another namespace's view may still use it
			}
			continue
		}
		hp := plan.hosts[svc.Hostname]
		fresh := func(sr *serviceResources) bool {
			return sr != nil && sr.gen == svc.Gen && sr.gwGen == v.GatewaysGen && sr.planKey == hp.keyOrEmpty()
		}
		if !fresh(sr) && fresh(shared[svc.Hostname]) {
			sr = shared[svc.Hostname] // planned alike in another plan: share its resources
		}
		if !fresh(sr) {
			var err error
			if sr, err = buildService(svc, key, v.Gateways, hp); err != nil {
				return nil, err
			}
			sr.gen, sr.gwGen, sr.planKey = svc.Gen, v.GatewaysGen, hp.keyOrEmpty()
		}
		next[svc.Hostname] = sr
		if shared != nil {
			shared[svc.Hostname] = sr
		}
		res[resource.ClusterType] = append(res[resource.ClusterType], sr.clusters...)
		res[resource.EndpointType] = append(res[resource.EndpointType], sr.endpoints...)
		res[resource.ListenerType] = append(res[resource.ListenerType], sr.listeners...)
		for port, vh := range sr.vhosts {
			routesByPort[port] = append(routesByPort[port], vh)
		}
	}
	b.memo[memoKey] = next // services gone from v drop out of the memo here
	if key.Kind == ProxyGRPC {
		in, err := b.inboundListeners(v, key) // xDS-enabled servers' inbound listeners
		if err != nil {
			return nil, err
		}
		res[resource.ListenerType] = append(res[resource.ListenerType], in...)
	}
	if key.Kind == ProxyGateway {
		var snis []string
		for _, svc := range v.Services {
			snis = append(snis, next[svc.Hostname].snis...)
		}
		// Exported services under the names peer meshes use (docs/federation.md).
		clusters, eps, aliases := gatewayExportAliases(v, res[resource.EndpointType])
		res[resource.ClusterType] = append(res[resource.ClusterType], clusters...)
		res[resource.EndpointType] = append(res[resource.EndpointType], eps...)
		snis = append(snis, aliases...)
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

// buildService makes one service's resources for one view. Gateways get no mTLS
// transport socket (they pass TLS through) and only their own network's endpoints; other
// proxies get mTLS when any endpoint of the service can terminate it, since a cluster has
// one transport socket for all its endpoints. hp (nil without traffic configuration) adds
// a cluster per DestinationRule subset, with the endpoints whose labels the subset
// selects and the subset in the SNI, and replaces the default route by the
// VirtualService's.
func buildService(svc *MergedService, key ViewKey, gateways map[mesh.NetworkID][]Gateway, hp *hostPlan) (*serviceResources, error) {
	sr := &serviceResources{}
	localOnly := key.Kind == ProxyGateway
	mtls := key.Kind != ProxyGateway && slices.ContainsFunc(svc.Endpoints, func(e mesh.Endpoint) bool { return e.MTLSReady })
	subsets := []subsetPlan{{}}
	if hp != nil {
		subsets = append([]subsetPlan{hp.base}, hp.subsets...)
	}
	for _, p := range svc.Ports {
		for _, sub := range subsets {
			out := mesh.OutboundName{Port: p.Port, Subset: sub.name, Host: svc.Hostname}
			name := out.ClusterName()
			c := edsCluster(name)
			pol := sub.policy(p.Port)
			pol.apply(c, key.Kind)
			if mtls {
				upstream := grpcUpstreamTLS
				if key.Kind == ProxySidecar {
					upstream = envoyUpstreamTLS
				}
				ts, err := upstream(out.SNI(), serverSANs(svc)...)
				if err != nil {
					return nil, err
				}
				c.TransportSocket = ts
			}
			sr.clusters = append(sr.clusters, c)
			local := splitHorizon(selectLabels(svc.Endpoints, sub.labels), p.Name, key.Network, gateways, localOnly)
			prio := pol.locality.priorities(key, local)
			cla := distributeWeights(loadAssignment(name, local, prio), pol.locality, key)
			sr.endpoints = append(sr.endpoints, cla)
			if key.Kind == ProxyGateway {
				// An Envoy-based gateway routes by SNI to an "sni-dnat" cluster named like
				// the server name itself, with this network's endpoints.
				sni := out.SNI()
				sr.clusters = append(sr.clusters, edsCluster(sni))
				sr.endpoints = append(sr.endpoints, distributeWeights(loadAssignment(sni, local, prio), pol.locality, key))
				sr.snis = append(sr.snis, sni)
			}
		}
		name := mesh.OutboundName{Port: p.Port, Host: svc.Hostname}.ClusterName()
		routes := hp.routesFor(p.Port)
		if routes == nil {
			routes = defaultRoutes(name, subsets[0].policy(p.Port).routeHash())
		}
		switch key.Kind {
		case ProxyGRPC:
			l, err := grpcListener(svc.Hostname, p.Port, name, routes)
			if err != nil {
				return nil, err
			}
			sr.listeners = append(sr.listeners, l)
		case ProxySidecar:
			if isHTTP(p.Protocol) {
				if sr.vhosts == nil {
					sr.vhosts = map[uint16]*route.VirtualHost{}
				}
				sr.vhosts[p.Port] = virtualHost(svc.Hostname, p.Port, name, routes)
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

// isHTTP reports whether a port's traffic can go through an HTTP connection manager
// (gRPC is HTTP/2); other ports get no sidecar listener yet.
func isHTTP(p mesh.Protocol) bool {
	return p == mesh.ProtocolHTTP || p == mesh.ProtocolHTTP2 || p == mesh.ProtocolGRPC
}

// adsSource says "over the same ADS stream", for EDS and RDS references.
func adsSource() *core.ConfigSource {
	return &core.ConfigSource{
		ResourceApiVersion:    core.ApiVersion_V3,
		ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}},
	}
}

// edsCluster is a round-robin cluster whose endpoints come over ADS under the same name.
func edsCluster(name string) *cluster.Cluster {
	return &cluster.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_EDS},
		EdsClusterConfig:     &cluster.Cluster_EdsClusterConfig{EdsConfig: adsSource()},
		ConnectTimeout:       durationpb.New(5 * time.Second),
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
	}
}

// loadAssignment groups endpoints by priority (prio[i] is eps[i]'s; nil is 0 for all)
// and locality. Every locality carries a load-balancing weight (the sum of its
// endpoints' weights): proxyless gRPC ignores localities without one and then fails
// every call.
func loadAssignment(name string, eps []lbEndpoint, prio []uint32) *endpoint.ClusterLoadAssignment {
	type group struct {
		prio uint32
		loc  mesh.Locality
	}
	byLoc := map[group][]lbEndpoint{}
	for i, e := range eps {
		g := group{loc: e.Locality}
		if prio != nil {
			g.prio = prio[i]
		}
		byLoc[g] = append(byLoc[g], e)
	}
	locs := make([]group, 0, len(byLoc))
	for l := range byLoc {
		locs = append(locs, l)
	}
	slices.SortFunc(locs, func(a, b group) int {
		return cmp.Or(cmp.Compare(a.prio, b.prio), cmp.Compare(a.loc.String(), b.loc.String()))
	})
	cla := &endpoint.ClusterLoadAssignment{ClusterName: name}
	for _, g := range locs {
		l := g.loc
		group := &endpoint.LocalityLbEndpoints{Locality: &core.Locality{Region: l.Region, Zone: l.Zone, SubZone: l.Subzone}, Priority: g.prio}
		var sum uint32
		for _, e := range byLoc[g] {
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

// distributeWeights replaces the locality weights of cla by localityLbSetting.distribute
// for the proxy (localityWeights) and drops the localities that get none. cla is
// returned unchanged when distribute does not apply.
func distributeWeights(cla *endpoint.ClusterLoadAssignment, lp *localityPolicy, key ViewKey) *endpoint.ClusterLoadAssignment {
	if lp == nil || len(lp.distribute) == 0 {
		return cla
	}
	own := map[mesh.Locality]uint32{}
	for _, g := range cla.Endpoints {
		l := g.GetLocality()
		own[mesh.Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubZone()}] += g.GetLoadBalancingWeight().GetValue()
	}
	weights, ok := lp.localityWeights(key, own)
	if !ok {
		return cla
	}
	kept := cla.Endpoints[:0]
	for _, g := range cla.Endpoints {
		l := g.GetLocality()
		if w := weights[mesh.Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubZone()}]; w > 0 {
			g.LoadBalancingWeight = wrapperspb.UInt32(w)
			kept = append(kept, g)
		}
	}
	cla.Endpoints = kept
	return cla
}

// healthStatus maps a mesh health to Envoy's; unknown stays UNKNOWN, which Envoy and
// grpc-go treat as usable.
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

// socketAddress is a TCP address.
func socketAddress(addr string, port uint32) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol: core.SocketAddress_TCP, Address: addr, PortSpecifier: &core.SocketAddress_PortValue{PortValue: port},
	}}}
}

// defaultRoutes is the route of a port no VirtualService routes: every path to
// clusterName, hashed by the DestinationRule's hash policies (if any).
func defaultRoutes(clusterName string, hash []*route.RouteAction_HashPolicy) []*route.Route {
	return []*route.Route{{
		Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
		Action: &route.Route_Route{Route: &route.RouteAction{
			ClusterSpecifier: &route.RouteAction_Cluster{Cluster: clusterName}, HashPolicy: hash}},
	}}
}

// virtualHost routes host (with or without the port) by routes, or, when routes is nil,
// every path to clusterName.
func virtualHost(host mesh.Hostname, port uint16, clusterName string, routes []*route.Route) *route.VirtualHost {
	hp := string(host) + ":" + strconv.Itoa(int(port))
	if routes == nil {
		routes = defaultRoutes(clusterName, nil)
	}
	return &route.VirtualHost{Name: hp, Domains: []string{string(host), hp}, Routes: routes}
}

// httpFilters are every connection manager's filters: fault injection (a no-op unless a
// route overrides it), then the router.
func httpFilters() ([]*hcm.HttpFilter, error) {
	ff, err := faultFilter()
	if err != nil {
		return nil, err
	}
	rf, err := routerFilter()
	if err != nil {
		return nil, err
	}
	return []*hcm.HttpFilter{ff, rf}, nil
}

// routerFilter is the terminal HTTP filter every connection manager needs.
func routerFilter() (*hcm.HttpFilter, error) {
	r, err := anypb.New(&router.Router{})
	if err != nil {
		return nil, err
	}
	return &hcm.HttpFilter{Name: wellknown.Router, ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: r}}, nil
}

// grpcListener is the api_listener a proxyless gRPC client resolves xds:///host:port to:
// an HttpConnectionManager with the fault and router filters and inline routes (see
// virtualHost).
func grpcListener(host mesh.Hostname, port uint16, clusterName string, routes []*route.Route) (*listener.Listener, error) {
	filters, err := httpFilters()
	if err != nil {
		return nil, err
	}
	name := GRPCListenerName(host, port)
	m := &hcm.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name:         name,
			VirtualHosts: []*route.VirtualHost{virtualHost(host, port, clusterName, routes)},
		}},
		HttpFilters: filters,
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
	filters, err := httpFilters()
	if err != nil {
		return nil, err
	}
	m := &hcm.HttpConnectionManager{
		StatPrefix: "outbound_0.0.0.0_" + routeName,
		RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{
			ConfigSource: adsSource(), RouteConfigName: routeName,
		}},
		HttpFilters: filters,
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

// grpcUpstreamTLS is the mTLS transport socket of a proxyless gRPC cluster: identity and
// roots from the bootstrap's certificate provider, and the SNI an east-west gateway routes
// on (grpc-go sends it when GRPC_EXPERIMENTAL_XDS_SNI=true).
// sans, when given, are the server identities the client accepts (serverSANs).
func grpcUpstreamTLS(sni string, sans ...*matcherv3.StringMatcher) (*core.TransportSocket, error) {
	ctx := &tlsv3.UpstreamTlsContext{
		Sni: sni,
		CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: mesh.CertProviderInstance, CertificateName: mesh.SDSIdentitySecret},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
				CaCertificateProviderInstance: &tlsv3.CertificateProviderPluginInstance{InstanceName: mesh.CertProviderInstance, CertificateName: mesh.SDSRootSecret},
				MatchSubjectAltNames:          sans, //nolint:staticcheck // grpc-go reads only this field
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
// sans, when given, are the server identities the client accepts (serverSANs), as URI
// SANs.
func envoyUpstreamTLS(sni string, sans ...*matcherv3.StringMatcher) (*core.TransportSocket, error) {
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
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: mesh.SDSIdentitySecret, SdsConfig: source}},
			ValidationContextType: &tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig{
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: mesh.SDSRootSecret, SdsConfig: source}},
		},
	}
	if len(sans) > 0 {
		ctx.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: uriSANs(sans)},
				ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: mesh.SDSRootSecret, SdsConfig: source}}}
	}
	a, err := anypb.New(ctx)
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: a}}, nil
}

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
