package primary

import (
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	apinet "istio.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// A DestinationRule's traffic policy reaches a cluster in layers, each more specific one
// replacing the fields it sets (loadBalancer, connectionPool, outlierDetection as a
// whole): the rule's trafficPolicy, its portLevelSettings for the cluster's port, the
// subset's trafficPolicy, and the subset's portLevelSettings for the port. Each layer is
// validated on its own, naming its field, before any is merged, so a merged policy is
// always valid.

// policyLayer is the part of one TrafficPolicy (or PortTrafficPolicy) that the builder
// acts on; nil fields are inherited from the layer below.
type policyLayer struct {
	lb      *apinet.LoadBalancerSettings
	pool    *apinet.ConnectionPoolSettings
	outlier *apinet.OutlierDetection
}

// over returns l with the fields m sets replacing l's.
func (l policyLayer) over(m policyLayer) policyLayer {
	if m.lb != nil {
		l.lb = m.lb
	}
	if m.pool != nil {
		l.pool = m.pool
	}
	if m.outlier != nil {
		l.outlier = m.outlier
	}
	return l
}

// layerAt returns tp's layer for port: its own fields with its portLevelSettings for
// port on top.
func layerAt(tp *apinet.TrafficPolicy, port uint16) policyLayer {
	if tp == nil {
		return policyLayer{}
	}
	l := policyLayer{lb: tp.GetLoadBalancer(), pool: tp.GetConnectionPool(), outlier: tp.GetOutlierDetection()}
	for _, pl := range tp.GetPortLevelSettings() {
		if pl.GetPort().GetNumber() == uint32(port) {
			l = l.over(policyLayer{lb: pl.GetLoadBalancer(), pool: pl.GetConnectionPool(), outlier: pl.GetOutlierDetection()})
		}
	}
	return l
}

// clusterPolicy is a DestinationRule's policy resolved for one cluster (one port of the
// host or of a subset). The zero value is the default: round robin and nothing else.
type clusterPolicy struct {
	lb      lbChoice
	hash    *hashPolicy // consistent hashing; lb is then unused
	outlier *apinet.OutlierDetection
	pool    *apinet.ConnectionPoolSettings
	// locality is set when the cluster's endpoints get priorities by the proxy's
	// locality: outlier detection is on (without it no client ever leaves priority 0,
	// Istio's rule) and localityLbSetting does not disable it.
	locality *localityPolicy
}

// hashPolicy is consistent hashing: a ring (or, for Envoy, a Maglev table) over the
// endpoints, and what each request is hashed on (the route's hash policies).
type hashPolicy struct {
	maglev    bool
	ringSize  uint64 // minimum ring size; 0 is the client's default
	tableSize uint64 // Maglev table size; 0 is Envoy's default
	route     []*route.RouteAction_HashPolicy
}

// compile resolves a merged, validated layer.
func (l policyLayer) compile() clusterPolicy {
	cp := clusterPolicy{lb: simpleLB(l.lb.GetSimple()), outlier: l.outlier, pool: l.pool}
	if ch := l.lb.GetConsistentHash(); ch != nil {
		cp.hash = compileHash(ch)
	}
	ls := l.lb.GetLocalityLbSetting()
	on := ls.GetEnabled() == nil || ls.GetEnabled().GetValue()
	switch {
	case on && len(ls.GetDistribute()) > 0: // weights need no outlier detection (Istio's rule)
		cp.locality = &localityPolicy{distribute: ls.GetDistribute()}
	case on && l.outlier != nil:
		cp.locality = &localityPolicy{failover: ls.GetFailover(), failoverPriority: ls.GetFailoverPriority()}
	}
	return cp
}

// simpleLB maps a validated simple policy; grpc-go has no random picker, so RANDOM is
// round robin for proxyless clients.
func simpleLB(s apinet.LoadBalancerSettings_SimpleLB) lbChoice {
	switch s {
	case apinet.LoadBalancerSettings_LEAST_REQUEST, apinet.LoadBalancerSettings_LEAST_CONN:
		return lbChoice{cluster.Cluster_LEAST_REQUEST, cluster.Cluster_LEAST_REQUEST}
	case apinet.LoadBalancerSettings_RANDOM:
		return lbChoice{cluster.Cluster_ROUND_ROBIN, cluster.Cluster_RANDOM}
	default:
		return lbChoice{cluster.Cluster_ROUND_ROBIN, cluster.Cluster_ROUND_ROBIN}
	}
}

// compileHash translates a validated consistentHash. useSourceIp is Envoy's source-IP
// hash and, for proxyless gRPC (which cannot see its own address as a server would),
// grpc-go's per-channel hash: each client channel sticks to one endpoint.
func compileHash(ch *apinet.LoadBalancerSettings_ConsistentHashLB) *hashPolicy {
	h := &hashPolicy{ringSize: ch.GetMinimumRingSize()}
	if rh := ch.GetRingHash(); rh != nil {
		h.ringSize = rh.GetMinimumRingSize()
	}
	if m := ch.GetMaglev(); m != nil {
		h.maglev, h.tableSize = true, m.GetTableSize()
	}
	var p []*route.RouteAction_HashPolicy
	switch {
	case ch.GetHttpHeaderName() != "":
		p = append(p, &route.RouteAction_HashPolicy{PolicySpecifier: &route.RouteAction_HashPolicy_Header_{
			Header: &route.RouteAction_HashPolicy_Header{HeaderName: ch.GetHttpHeaderName()}}})
	case ch.GetHttpCookie() != nil:
		c := ch.GetHttpCookie()
		hc := &route.RouteAction_HashPolicy_Cookie{Name: c.GetName(), Path: c.GetPath()}
		if c.GetTtl() != nil {
			hc.Ttl = durationpb.New(c.GetTtl().AsDuration())
		}
		p = append(p, &route.RouteAction_HashPolicy{PolicySpecifier: &route.RouteAction_HashPolicy_Cookie_{Cookie: hc}})
	case ch.GetUseSourceIp():
		p = append(p,
			&route.RouteAction_HashPolicy{PolicySpecifier: &route.RouteAction_HashPolicy_ConnectionProperties_{
				ConnectionProperties: &route.RouteAction_HashPolicy_ConnectionProperties{SourceIp: true}}},
			&route.RouteAction_HashPolicy{PolicySpecifier: &route.RouteAction_HashPolicy_FilterState_{
				FilterState: &route.RouteAction_HashPolicy_FilterState{Key: grpcChannelIDKey}}})
	case ch.GetHttpQueryParameterName() != "":
		p = append(p, &route.RouteAction_HashPolicy{PolicySpecifier: &route.RouteAction_HashPolicy_QueryParameter_{
			QueryParameter: &route.RouteAction_HashPolicy_QueryParameter{Name: ch.GetHttpQueryParameterName()}}})
	}
	h.route = p
	return h
}

// grpcChannelIDKey is the filter-state key grpc-go hashes a channel's identity on.
const grpcChannelIDKey = "io.grpc.channel_id"

// maxRingSize is the largest ring either client builds (Envoy's and grpc-go's limit).
const maxRingSize = 8 * 1024 * 1024

// validateLayer checks one layer, naming field (e.g. "subsets[1].trafficPolicy"), and
// returns warnings for what is accepted but not acted on.
func validateLayer(field string, l policyLayer) ([]string, *configError) {
	var warn []string
	if lb := l.lb; lb != nil {
		w, err := validateLB(field+".loadBalancer", lb)
		if err != nil {
			return nil, err
		}
		warn = append(warn, w...)
	}
	if p := l.pool; p != nil {
		w, err := validatePool(field+".connectionPool", p)
		if err != nil {
			return nil, err
		}
		warn = append(warn, w...)
	}
	if o := l.outlier; o != nil {
		w, err := validateOutlier(field+".outlierDetection", o)
		if err != nil {
			return nil, err
		}
		warn = append(warn, w...)
	}
	return warn, nil
}

func validateLB(f string, lb *apinet.LoadBalancerSettings) ([]string, *configError) {
	var warn []string
	switch lb.GetSimple() {
	case apinet.LoadBalancerSettings_UNSPECIFIED, apinet.LoadBalancerSettings_ROUND_ROBIN,
		apinet.LoadBalancerSettings_LEAST_REQUEST, apinet.LoadBalancerSettings_LEAST_CONN:
	case apinet.LoadBalancerSettings_RANDOM:
		warn = append(warn, f+".simple RANDOM is round robin for proxyless gRPC (grpc-go has no random picker)")
	default:
		return nil, rejectConfig(ReasonUnsupported, "%s.simple %s is not supported", f, lb.GetSimple())
	}
	if ch := lb.GetConsistentHash(); ch != nil {
		hf := f + ".consistentHash"
		switch {
		case ch.GetHttpHeaderName() != "":
			if errs := validation.IsHTTPHeaderName(ch.GetHttpHeaderName()); len(errs) > 0 || strings.HasPrefix(ch.GetHttpHeaderName(), ":") {
				return nil, rejectConfig(ReasonInvalid, "%s.httpHeaderName %q: not a header name", hf, ch.GetHttpHeaderName())
			}
		case ch.GetHttpCookie() != nil:
			c := ch.GetHttpCookie()
			if c.GetName() == "" {
				return nil, rejectConfig(ReasonInvalid, "%s.httpCookie.name: required", hf)
			}
			if t := c.GetTtl(); t != nil && (t.CheckValid() != nil || t.AsDuration() < 0) {
				return nil, rejectConfig(ReasonInvalid, "%s.httpCookie.ttl: not a non-negative duration", hf)
			}
			if len(c.GetAttributes()) > 0 {
				return nil, rejectConfig(ReasonUnsupported, "%s.httpCookie.attributes is not supported yet", hf)
			}
			warn = append(warn, hf+".httpCookie: proxyless gRPC hashes only on headers and its channel; its calls are spread at random")
		case ch.GetUseSourceIp():
			warn = append(warn, hf+".useSourceIp: proxyless gRPC clients hash on their channel instead (one endpoint per client channel)")
		case ch.GetHttpQueryParameterName() != "":
			warn = append(warn, hf+".httpQueryParameterName: proxyless gRPC hashes only on headers and its channel; its calls are spread at random")
		default:
			return nil, rejectConfig(ReasonInvalid, "%s: one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName is required", hf)
		}
		ring := max(ch.GetMinimumRingSize(), ch.GetRingHash().GetMinimumRingSize())
		if ring > maxRingSize {
			return nil, rejectConfig(ReasonInvalid, "%s: minimumRingSize %d is over the clients' limit of %d", hf, ring, maxRingSize)
		}
		if m := ch.GetMaglev(); m != nil {
			if ts := m.GetTableSize(); ts != 0 && (!isPrime(ts) || ts >= 5000011) {
				return nil, rejectConfig(ReasonInvalid, "%s.maglev.tableSize %d: must be a prime below 5000011 (Envoy's rule)", hf, ts)
			}
			warn = append(warn, hf+".maglev is ring hash for proxyless gRPC (grpc-go has no Maglev)")
		}
	}
	if ls := lb.GetLocalityLbSetting(); ls != nil {
		lf := f + ".localityLbSetting"
		if len(ls.GetDistribute()) > 0 && (len(ls.GetFailover()) > 0 || len(ls.GetFailoverPriority()) > 0) {
			return nil, rejectConfig(ReasonInvalid, "%s: distribute and failover/failoverPriority are mutually exclusive", lf)
		}
		for i, d := range ls.GetDistribute() {
			df := fmt.Sprintf("%s.distribute[%d]", lf, i)
			if err := validateLocalityPattern(d.GetFrom()); err != nil {
				return nil, rejectConfig(ReasonInvalid, "%s.from %q: %v", df, d.GetFrom(), err)
			}
			if len(d.GetTo()) == 0 {
				return nil, rejectConfig(ReasonInvalid, "%s.to: at least one locality is required", df)
			}
			var sum uint32
			for _, to := range slices.Sorted(maps.Keys(d.GetTo())) {
				w := d.GetTo()[to]
				if err := validateLocalityPattern(to); err != nil {
					return nil, rejectConfig(ReasonInvalid, "%s.to[%s]: %v", df, to, err)
				}
				if w == 0 || w > 100 {
					return nil, rejectConfig(ReasonInvalid, "%s.to[%s] %d: a weight is 1 to 100", df, to, w)
				}
				sum += w
			}
			if sum != 100 {
				return nil, rejectConfig(ReasonInvalid, "%s.to: weights sum to %d, not 100", df, sum)
			}
		}
		for i, fo := range ls.GetFailover() {
			if fo.GetFrom() == "" || fo.GetTo() == "" || fo.GetFrom() == fo.GetTo() {
				return nil, rejectConfig(ReasonInvalid, "%s.failover[%d]: from and to must be two different regions", lf, i)
			}
		}
		for i, l := range ls.GetFailoverPriority() {
			if !slices.Contains(failoverPriorityLabels, l) {
				return nil, rejectConfig(ReasonUnsupported, "%s.failoverPriority[%d] %q: only %s are supported yet", lf, i, l, strings.Join(failoverPriorityLabels, ", "))
			}
		}
	}
	if lb.GetWarmupDurationSecs() != nil || lb.GetWarmup() != nil || lb.GetZoneAwareLbSetting() != nil {
		warn = append(warn, f+": warmup and zoneAwareLbSetting are not supported yet and are ignored")
	}
	return warn, nil
}

func validatePool(f string, p *apinet.ConnectionPoolSettings) ([]string, *configError) {
	var warn []string
	t, h := p.GetTcp(), p.GetHttp()
	for name, v := range map[string]int32{
		"tcp.maxConnections": t.GetMaxConnections(), "http.http1MaxPendingRequests": h.GetHttp1MaxPendingRequests(),
		"http.http2MaxRequests": h.GetHttp2MaxRequests(), "http.maxRetries": h.GetMaxRetries(),
		"http.maxRequestsPerConnection": h.GetMaxRequestsPerConnection(), "http.maxConcurrentStreams": h.GetMaxConcurrentStreams(),
	} {
		if v < 0 {
			return nil, rejectConfig(ReasonInvalid, "%s.%s %d is negative", f, name, v)
		}
	}
	if ct := t.GetConnectTimeout(); ct != nil && (ct.CheckValid() != nil || ct.AsDuration() <= 0) {
		return nil, rejectConfig(ReasonInvalid, "%s.tcp.connectTimeout: not a positive duration", f)
	}
	if t.GetTcpKeepalive() != nil || t.GetMaxConnectionDuration() != nil || t.GetIdleTimeout() != nil ||
		h.GetIdleTimeout() != nil || h.GetMaxRequestsPerConnection() != 0 || h.GetH2UpgradePolicy() != 0 ||
		h.GetUseClientProtocol() || h.GetMaxConcurrentStreams() != 0 || h.GetHttp2KeepAlive() != nil {
		warn = append(warn, f+": only tcp.maxConnections, tcp.connectTimeout, http.http1MaxPendingRequests, http.http2MaxRequests and http.maxRetries are acted on yet")
	}
	if t.GetMaxConnections() != 0 || t.GetConnectTimeout() != nil || h.GetHttp1MaxPendingRequests() != 0 || h.GetMaxRetries() != 0 {
		warn = append(warn, f+": proxyless gRPC honours only http.http2MaxRequests (as max_requests)")
	}
	return warn, nil
}

func validateOutlier(f string, o *apinet.OutlierDetection) ([]string, *configError) {
	var warn []string
	for name, d := range map[string]*durationpb.Duration{"interval": o.GetInterval(), "baseEjectionTime": o.GetBaseEjectionTime()} {
		if d != nil && (d.CheckValid() != nil || d.AsDuration() <= 0) {
			return nil, rejectConfig(ReasonInvalid, "%s.%s: not a positive duration", f, name)
		}
	}
	if o.GetMaxEjectionPercent() < 0 || o.GetMaxEjectionPercent() > 100 {
		return nil, rejectConfig(ReasonInvalid, "%s.maxEjectionPercent %d: not in 0..100", f, o.GetMaxEjectionPercent())
	}
	if o.GetMinHealthPercent() > 100 {
		return nil, rejectConfig(ReasonInvalid, "%s.minHealthPercent %d: not over 100", f, o.GetMinHealthPercent())
	}
	if o.GetConsecutiveErrors() != 0 {
		warn = append(warn, f+".consecutiveErrors is deprecated and ignored (as in Istio): use consecutive5xxErrors or consecutiveGatewayErrors")
	}
	if o.GetSplitExternalLocalOriginErrors() || o.GetConsecutiveLocalOriginFailures() != nil {
		warn = append(warn, f+": local-origin failures are Envoy's only; proxyless gRPC counts every failed call")
	}
	return warn, nil
}

// failoverPriorityLabels are the labels failoverPriority may name: the ones whose value
// for the proxy follows from its view (network and locality). Other labels would need the
// proxy's own pod labels in the view key.
var failoverPriorityLabels = []string{
	"topology.istio.io/network", "topology.kubernetes.io/region", "topology.kubernetes.io/zone", "topology.istio.io/subzone",
}

func isPrime(n uint64) bool {
	if n < 2 {
		return false
	}
	for d := uint64(2); d*d <= n; d++ {
		if n%d == 0 {
			return false
		}
	}
	return true
}

// apply writes the policy into c for a client kind. Envoy gets Istio's translation;
// proxyless gRPC gets what grpc-go v1.85 implements: ring_hash (xxHash) and
// least_request, circuit breaking on max_requests, and outlier detection by failure
// percentage (gRFC A50 has no consecutive-errors algorithm).
func (cp *clusterPolicy) apply(c *cluster.Cluster, kind ProxyKind) {
	c.LbPolicy = cp.lb.policy(kind)
	if h := cp.hash; h != nil {
		if h.maglev && kind == ProxySidecar {
			c.LbPolicy = cluster.Cluster_MAGLEV
			if h.tableSize != 0 {
				c.LbConfig = &cluster.Cluster_MaglevLbConfig_{MaglevLbConfig: &cluster.Cluster_MaglevLbConfig{TableSize: wrapperspb.UInt64(h.tableSize)}}
			}
		} else {
			c.LbPolicy = cluster.Cluster_RING_HASH
			rc := &cluster.Cluster_RingHashLbConfig{HashFunction: cluster.Cluster_RingHashLbConfig_XX_HASH}
			if h.ringSize != 0 {
				rc.MinimumRingSize = wrapperspb.UInt64(h.ringSize)
			}
			c.LbConfig = &cluster.Cluster_RingHashLbConfig_{RingHashLbConfig: rc}
		}
	}
	if p := cp.pool; p != nil {
		limit := func(v int32) *wrapperspb.UInt32Value {
			if v <= 0 {
				return wrapperspb.UInt32(math.MaxUint32) // Istio: an unset limit is no limit
			}
			return wrapperspb.UInt32(uint32(v))
		}
		t, h := p.GetTcp(), p.GetHttp()
		c.CircuitBreakers = &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
			Priority:           core.RoutingPriority_DEFAULT,
			MaxConnections:     limit(t.GetMaxConnections()),
			MaxPendingRequests: limit(h.GetHttp1MaxPendingRequests()),
			MaxRequests:        limit(h.GetHttp2MaxRequests()),
			MaxRetries:         limit(h.GetMaxRetries()),
		}}}
		if ct := t.GetConnectTimeout(); ct != nil {
			c.ConnectTimeout = durationpb.New(ct.AsDuration())
		}
	}
	if o := cp.outlier; o != nil {
		if kind == ProxySidecar {
			c.OutlierDetection = envoyOutlier(o)
			// Istio: no panic mode unless asked for, since few pods per service are usual.
			c.CommonLbConfig = &cluster.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: float64(max(o.GetMinHealthPercent(), 0))}}
		} else {
			c.OutlierDetection = grpcOutlier(o)
		}
	}
}

// envoyOutlier is Istio's translation: consecutive 5xx and gateway errors, success-rate
// ejection off.
func envoyOutlier(o *apinet.OutlierDetection) *cluster.OutlierDetection {
	out := &cluster.OutlierDetection{EnforcingSuccessRate: wrapperspb.UInt32(0)}
	enforce := func(v uint32) *wrapperspb.UInt32Value {
		if v > 0 {
			return wrapperspb.UInt32(100)
		}
		return wrapperspb.UInt32(0)
	}
	if e := o.GetConsecutive_5XxErrors(); e != nil {
		out.Consecutive_5Xx, out.EnforcingConsecutive_5Xx = wrapperspb.UInt32(e.GetValue()), enforce(e.GetValue())
	}
	if e := o.GetConsecutiveGatewayErrors(); e != nil {
		out.ConsecutiveGatewayFailure, out.EnforcingConsecutiveGatewayFailure = wrapperspb.UInt32(e.GetValue()), enforce(e.GetValue())
	}
	setTimes(out, o)
	if o.GetSplitExternalLocalOriginErrors() {
		out.SplitExternalLocalOriginErrors = true
		if n := o.GetConsecutiveLocalOriginFailures().GetValue(); n > 0 {
			out.ConsecutiveLocalOriginFailure, out.EnforcingConsecutiveLocalOriginFailure = wrapperspb.UInt32(n), wrapperspb.UInt32(100)
		}
		out.EnforcingLocalOriginSuccessRate = wrapperspb.UInt32(0)
	}
	return out
}

// grpcOutlier translates consecutive errors into the failure-percentage ejection grpc-go
// implements: an endpoint that answered at least N calls within one interval, at least
// half of them failed, is ejected. N is consecutive5xxErrors, else consecutiveGatewayErrors,
// else Envoy's default of 5; when the one that applies is 0, nothing is ejected (as for
// Envoy). Any failed call counts (grpc-go cannot tell 5xx from gateway errors), and
// minimum hosts is 1 so that small services are watched too.
func grpcOutlier(o *apinet.OutlierDetection) *cluster.OutlierDetection {
	out := &cluster.OutlierDetection{EnforcingSuccessRate: wrapperspb.UInt32(0)}
	n := uint32(5)
	switch {
	case o.GetConsecutive_5XxErrors() != nil:
		n = o.GetConsecutive_5XxErrors().GetValue()
	case o.GetConsecutiveGatewayErrors() != nil:
		n = o.GetConsecutiveGatewayErrors().GetValue()
	}
	if n > 0 {
		out.EnforcingFailurePercentage = wrapperspb.UInt32(100)
		out.FailurePercentageThreshold = wrapperspb.UInt32(50)
		out.FailurePercentageRequestVolume = wrapperspb.UInt32(n)
		out.FailurePercentageMinimumHosts = wrapperspb.UInt32(1)
	}
	setTimes(out, o)
	return out
}

// setTimes copies the timing fields both clients share.
func setTimes(out *cluster.OutlierDetection, o *apinet.OutlierDetection) {
	if d := o.GetInterval(); d != nil {
		out.Interval = durationpb.New(d.AsDuration())
	}
	if d := o.GetBaseEjectionTime(); d != nil {
		out.BaseEjectionTime = durationpb.New(d.AsDuration())
	}
	if p := o.GetMaxEjectionPercent(); p > 0 {
		out.MaxEjectionPercent = wrapperspb.UInt32(uint32(p))
	}
}

// routeHash returns the hash policies of routes to this cluster (nil without hashing).
func (cp clusterPolicy) routeHash() []*route.RouteAction_HashPolicy {
	if cp.hash == nil {
		return nil
	}
	return cp.hash.route
}

// addHash appends ps to a route's hash policies, skipping ones it already has (weighted
// destinations of one host share their policy).
func addHash(ra *route.RouteAction, ps []*route.RouteAction_HashPolicy) {
	for _, p := range ps {
		if !slices.ContainsFunc(ra.HashPolicy, func(q *route.RouteAction_HashPolicy) bool { return proto.Equal(p, q) }) {
			ra.HashPolicy = append(ra.HashPolicy, p)
		}
	}
}

// planPolicies validates every layer of a DestinationRule's policy and resolves it per
// port of the host: for the rule itself (base) and for each subset, in the rule's order.
func planPolicies(dr *apinet.DestinationRule, ports []ServicePort) (map[uint16]clusterPolicy, []map[uint16]clusterPolicy, []string, *configError) {
	var warn []string
	check := func(field string, tp *apinet.TrafficPolicy) *configError {
		if tp == nil {
			return nil
		}
		w, err := validateLayer(field, policyLayer{lb: tp.GetLoadBalancer(), pool: tp.GetConnectionPool(), outlier: tp.GetOutlierDetection()})
		if err != nil {
			return err
		}
		warn = append(warn, w...)
		for i, pl := range tp.GetPortLevelSettings() {
			pf := fmt.Sprintf("%s.portLevelSettings[%d]", field, i)
			n := pl.GetPort().GetNumber()
			if n == 0 || !slices.ContainsFunc(ports, func(p ServicePort) bool { return uint32(p.Port) == n }) {
				warn = append(warn, fmt.Sprintf("%s.port %d: not a port of the host; ignored", pf, n))
			}
			if pl.GetTls() != nil {
				warn = append(warn, pf+".tls is not supported yet and is ignored")
			}
			w, err := validateLayer(pf, policyLayer{lb: pl.GetLoadBalancer(), pool: pl.GetConnectionPool(), outlier: pl.GetOutlierDetection()})
			if err != nil {
				return err
			}
			warn = append(warn, w...)
		}
		if tp.GetTls() != nil || tp.GetTunnel() != nil || tp.GetProxyProtocol() != nil || tp.GetRetryBudget() != nil {
			warn = append(warn, field+": tls, tunnel, proxyProtocol and retryBudget are not supported yet and are ignored")
		}
		return nil
	}
	top := dr.GetTrafficPolicy()
	if err := check("trafficPolicy", top); err != nil {
		return nil, nil, nil, err
	}
	subsets := dr.GetSubsets()
	for i, s := range subsets {
		if err := check(fmt.Sprintf("subsets[%d].trafficPolicy", i), s.GetTrafficPolicy()); err != nil {
			return nil, nil, nil, err
		}
	}
	base := map[uint16]clusterPolicy{}
	perSubset := make([]map[uint16]clusterPolicy, len(subsets))
	for _, p := range ports {
		l := layerAt(top, p.Port)
		base[p.Port] = l.compile()
		for i, s := range subsets {
			if perSubset[i] == nil {
				perSubset[i] = map[uint16]clusterPolicy{}
			}
			perSubset[i][p.Port] = l.over(layerAt(s.GetTrafficPolicy(), p.Port)).compile()
		}
	}
	return base, perSubset, warn, nil
}
