package primary

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// policyDR is a DestinationRule using every traffic policy the builder acts on, written
// from Istio's DestinationRule reference: reviews hashes on a header, ejects failing
// endpoints and fails over from its zone to the other (locality priorities), v3 limits
// concurrent requests; ratings balances its admin port differently from its main one.
const (
	policyDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo, resourceVersion: "11"}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 100}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: LEAST_REQUEST}
      connectionPool: {http: {http2MaxRequests: 10}, tcp: {connectTimeout: 2s}}
`
	policyRatingsDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo, resourceVersion: "12"}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
      outlierDetection: {consecutiveGatewayErrors: 2}
      connectionPool: {http: {http2MaxRequests: 1}}
`
)

// TestPolicyGolden pins the clusters, endpoints and routes of the policy rules for a
// proxyless client and an Envoy sidecar, both in locality r/c1
// (testdata/policy-<kind>.golden; rewrite with -update).
func TestPolicyGolden(t *testing.T) {
	v := bookinfoView(t, nil, []string{policyDR, policyRatingsDR})
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Fatalf("object refused: %+v", st)
		}
	}
	loc := mesh.Locality{Region: "r", Zone: "c1"}
	for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1", Locality: loc}, {Kind: ProxySidecar, Network: "n1", Locality: loc}} {
		t.Run(string(key.Kind), func(t *testing.T) {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
			got, err := renderGolden(key, res)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "policy-"+string(key.Kind)+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)); d != "" {
				t.Errorf("policy output for %s differs from %s (-want +got):\n%s", key, path, d)
			}
		})
	}
}

// TestPolicyPerClient checks what the golden files show in bulk: ring hash and its header
// for both clients, outlier detection as failure percentage for gRPC and consecutive
// errors for Envoy, circuit breaking on the subset, port-level overrides, and locality
// priorities that follow the proxy's own locality.
func TestPolicyPerClient(t *testing.T) {
	v := bookinfoView(t, nil, []string{policyDR, policyRatingsDR})
	clusters := func(key ViewKey) (map[string]*cluster.Cluster, map[string]*endpoint.ClusterLoadAssignment) {
		res, err := BuildResources(v, key)
		if err != nil {
			t.Fatal(err)
		}
		cs, es := map[string]*cluster.Cluster{}, map[string]*endpoint.ClusterLoadAssignment{}
		for _, r := range res[resource.ClusterType] {
			cs[r.(*cluster.Cluster).Name] = r.(*cluster.Cluster)
		}
		for _, r := range res[resource.EndpointType] {
			es[r.(*endpoint.ClusterLoadAssignment).ClusterName] = r.(*endpoint.ClusterLoadAssignment)
		}
		return cs, es
	}
	const reviews = "outbound|9080||reviews.bookinfo.svc.cluster.local"
	const v3 = "outbound|9080|v3|reviews.bookinfo.svc.cluster.local"
	g, gEDS := clusters(ViewKey{Kind: ProxyGRPC, Network: "n1", Locality: mesh.Locality{Region: "r", Zone: "c1"}})
	e, _ := clusters(ViewKey{Kind: ProxySidecar, Network: "n1", Locality: mesh.Locality{Region: "r", Zone: "c1"}})
	if g[reviews].LbPolicy != cluster.Cluster_RING_HASH || g[reviews].GetRingHashLbConfig().GetMinimumRingSize().GetValue() != 1024 {
		t.Errorf("gRPC reviews: %v %v", g[reviews].LbPolicy, g[reviews].GetRingHashLbConfig())
	}
	if od := g[reviews].OutlierDetection; od.GetFailurePercentageRequestVolume().GetValue() != 3 || od.GetEnforcingFailurePercentage().GetValue() != 100 || od.Consecutive_5Xx != nil {
		t.Errorf("gRPC outlier detection: %v", od)
	}
	if od := e[reviews].OutlierDetection; od.GetConsecutive_5Xx().GetValue() != 3 || od.GetEnforcingConsecutive_5Xx().GetValue() != 100 || od.EnforcingFailurePercentage != nil {
		t.Errorf("Envoy outlier detection: %v", od)
	}
	if g[v3].LbPolicy != cluster.Cluster_LEAST_REQUEST || g[v3].GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue() != 10 || g[v3].GetConnectTimeout().AsDuration().Seconds() != 2 {
		t.Errorf("v3 subset: %v", g[v3])
	}
	// The subset inherits the rule's outlier detection, so its endpoints have priorities too.
	if g[v3].OutlierDetection == nil {
		t.Error("v3 lost the rule's outlier detection")
	}
	const admin = "outbound|9090||ratings.bookinfo.svc.cluster.local"
	const main = "outbound|9080||ratings.bookinfo.svc.cluster.local"
	if g[main].LbPolicy != cluster.Cluster_LEAST_REQUEST || g[main].OutlierDetection != nil || g[main].CircuitBreakers != nil {
		t.Errorf("ratings main port: %v", g[main])
	}
	if g[admin].LbPolicy != cluster.Cluster_ROUND_ROBIN || e[admin].LbPolicy != cluster.Cluster_RANDOM ||
		g[admin].GetOutlierDetection().GetFailurePercentageRequestVolume().GetValue() != 2 ||
		g[admin].GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue() != 1 {
		t.Errorf("ratings admin port: gRPC %v, Envoy %v", g[admin], e[admin].LbPolicy)
	}
	prios := func(cla *endpoint.ClusterLoadAssignment) map[string]uint32 {
		out := map[string]uint32{}
		for _, l := range cla.Endpoints {
			for _, le := range l.LbEndpoints {
				out[le.GetEndpoint().GetAddress().GetSocketAddress().GetAddress()] = l.Priority
			}
		}
		return out
	}
	// r/c1 holds v1 and v2; v3 is behind n2's gateway in r/c2.
	if d := cmp.Diff(map[string]uint32{"10.1.1.1": 0, "10.1.1.2": 0, "192.0.2.2": 1}, prios(gEDS[reviews])); d != "" {
		t.Errorf("priorities for a proxy in r/c1 (-want +got):\n%s", d)
	}
	_, fromC2 := clusters(ViewKey{Kind: ProxyGRPC, Network: "n1", Locality: mesh.Locality{Region: "r", Zone: "c2"}})
	if d := cmp.Diff(map[string]uint32{"10.1.1.1": 1, "10.1.1.2": 1, "192.0.2.2": 0}, prios(fromC2[reviews])); d != "" {
		t.Errorf("priorities for a proxy in r/c2 (-want +got):\n%s", d)
	}
	_, noLoc := clusters(ViewKey{Kind: ProxyGRPC, Network: "n1"})
	if d := cmp.Diff(map[string]uint32{"10.1.1.1": 0, "10.1.1.2": 0, "192.0.2.2": 0}, prios(noLoc[reviews])); d != "" {
		t.Errorf("priorities for a proxy without a locality (-want +got):\n%s", d)
	}
}

// TestLocalityPriorities checks Istio's priority rules on their own.
func TestLocalityPriorities(t *testing.T) {
	fo := func(from, to string) *localityPolicy {
		p := &localityPolicy{}
		dr := mustDR(t, "spec:\n  trafficPolicy:\n    loadBalancer:\n      localityLbSetting:\n        failover: [{from: "+from+", to: "+to+"}]\n")
		p.failover = dr.Spec.GetTrafficPolicy().GetLoadBalancer().GetLocalityLbSetting().GetFailover()
		return p
	}
	ep := func(region, zone, sub string, nw mesh.NetworkID) lbEndpoint {
		return lbEndpoint{Locality: mesh.Locality{Region: region, Zone: zone, Subzone: sub}, Network: nw}
	}
	eps := []lbEndpoint{ep("us", "a", "x", "n1"), ep("us", "a", "y", "n1"), ep("us", "b", "", "n1"), ep("eu", "a", "", "n2"), ep("ap", "a", "", "n2")}
	me := ViewKey{Network: "n1", Locality: mesh.Locality{Region: "us", Zone: "a", Subzone: "x"}}
	cases := []struct {
		name string
		lp   *localityPolicy
		key  ViewKey
		want []uint32
	}{
		{"no policy", nil, me, []uint32{0, 0, 0, 0, 0}},
		{"default tiers", &localityPolicy{}, me, []uint32{0, 1, 2, 3, 3}},
		{"failover us to ap", fo("us", "ap"), me, []uint32{0, 1, 2, 4, 3}},
		{"failover for another region", fo("eu", "ap"), me, []uint32{0, 1, 2, 3, 3}},
		{"proxy without locality", &localityPolicy{}, ViewKey{Network: "n1"}, []uint32{0, 0, 0, 0, 0}},
		{"failoverPriority network, region", &localityPolicy{failoverPriority: []string{"topology.istio.io/network", "topology.kubernetes.io/region"}}, me, []uint32{0, 0, 0, 1, 1}},
		{"failoverPriority network for a proxy without locality", &localityPolicy{failoverPriority: []string{"topology.istio.io/network"}}, ViewKey{Network: "n1"}, []uint32{0, 0, 0, 1, 1}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := tc.lp.priorities(tc.key, eps)
			if d := cmp.Diff(compactWant(tc.want), got); d != "" {
				t.Errorf("priorities (-want +got):\n%s", d)
			}
		})
	}
}

// compactWant renumbers raw priorities to 0..n-1, as the builder must.
func compactWant(raw []uint32) []uint32 {
	seen := map[uint32]bool{}
	for _, r := range raw {
		seen[r] = true
	}
	out := make([]uint32, len(raw))
	for i, r := range raw {
		for s := range seen {
			if s < r {
				out[i]++
			}
		}
	}
	return out
}

// TestPolicyBadConfig checks that each kind of bad traffic policy refuses its
// DestinationRule whole, naming the field.
func TestPolicyBadConfig(t *testing.T) {
	dr := func(policy string) string {
		return "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  host: ratings\n  trafficPolicy:\n" + policy
	}
	cases := []struct{ name, dr, reason, msg string }{
		{"consistentHash without a key", dr("    loadBalancer: {consistentHash: {minimumRingSize: 10}}\n"), ReasonInvalid, "trafficPolicy.loadBalancer.consistentHash: one of"},
		{"bad hash header", dr("    loadBalancer: {consistentHash: {httpHeaderName: \"a b\"}}\n"), ReasonInvalid, "httpHeaderName"},
		{"ring too large", dr("    loadBalancer: {consistentHash: {httpHeaderName: x, ringHash: {minimumRingSize: 100000000}}}\n"), ReasonInvalid, "minimumRingSize"},
		{"maglev table not prime", dr("    loadBalancer: {consistentHash: {httpHeaderName: x, maglev: {tableSize: 1000}}}\n"), ReasonInvalid, "tableSize 1000"},
		{"cookie without a name", dr("    loadBalancer: {consistentHash: {httpCookie: {ttl: 1s}}}\n"), ReasonInvalid, "httpCookie.name"},
		{"distribute weights not 100", dr("    loadBalancer: {localityLbSetting: {distribute: [{from: \"us/*\", to: {\"us/a/*\": 60, \"us/b/*\": 30}}]}}\n"), ReasonInvalid, "weights sum to 90"},
		{"distribute bad pattern", dr("    loadBalancer: {localityLbSetting: {distribute: [{from: \"us*/a\", to: {\"us/a\": 100}}]}}\n"), ReasonInvalid, "distribute[0].from"},
		{"distribute with failover", dr("    loadBalancer: {localityLbSetting: {distribute: [{from: \"us/*\", to: {\"us/a\": 100}}], failover: [{from: us, to: eu}]}}\n"), ReasonInvalid, "mutually exclusive"},
		{"failover to itself", dr("    loadBalancer: {localityLbSetting: {failover: [{from: us, to: us}]}}\n"), ReasonInvalid, "failover[0]"},
		{"failoverPriority on a pod label", dr("    loadBalancer: {localityLbSetting: {failoverPriority: [version]}}\n"), ReasonUnsupported, `failoverPriority[0] "version"`},
		{"ejection over 100 %", dr("    outlierDetection: {maxEjectionPercent: 150}\n"), ReasonInvalid, "outlierDetection.maxEjectionPercent 150"},
		{"zero interval", dr("    outlierDetection: {interval: 0s}\n"), ReasonInvalid, "outlierDetection.interval"},
		{"negative max requests", dr("    connectionPool: {http: {http2MaxRequests: -1}}\n"), ReasonInvalid, "http.http2MaxRequests -1"},
		{"zero connect timeout", dr("    connectionPool: {tcp: {connectTimeout: 0s}}\n"), ReasonInvalid, "tcp.connectTimeout"},
		{"bad port-level policy", dr("    portLevelSettings:\n    - port: {number: 9090}\n      outlierDetection: {maxEjectionPercent: 101}\n"), ReasonInvalid, "trafficPolicy.portLevelSettings[0].outlierDetection"},
		{"bad subset policy", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  host: ratings\n  subsets:\n  - name: a\n    labels: {version: a}\n    trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n", ReasonUnsupported, "subsets[0].trafficPolicy.loadBalancer.simple PASSTHROUGH"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := bookinfoView(t, []string{bookinfoVS}, []string{bookinfoDR, tc.dr})
			var bad *ConfigStatus
			plan := planTraffic(v)
			for i, st := range plan.status {
				if st.Name == "bad" {
					bad = &plan.status[i]
				} else if !st.Applied {
					t.Errorf("a good object was refused too: %+v", st)
				}
			}
			if bad == nil || bad.Applied || bad.Reason != tc.reason || !strings.Contains(bad.Message, tc.msg) {
				t.Fatalf("status %+v; want refused with %s, message containing %q", bad, tc.reason, tc.msg)
			}
			if plan.hosts["ratings.bookinfo.svc.cluster.local"] != nil {
				t.Errorf("the refused rule left a plan for ratings: %+v", plan.hosts["ratings.bookinfo.svc.cluster.local"])
			}
		})
	}
}

// TestPolicyWarnings checks that accepted-but-partial policies say so on configz.
func TestPolicyWarnings(t *testing.T) {
	v := bookinfoView(t, nil, []string{`
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
    connectionPool: {tcp: {maxConnections: 5}}
    portLevelSettings:
    - port: {number: 1234}
      loadBalancer: {simple: ROUND_ROBIN}
`})
	st := planTraffic(v).status[0]
	if !st.Applied {
		t.Fatalf("refused: %+v", st)
	}
	for _, want := range []string{"useSourceIp", "honours only http.http2MaxRequests", "port 1234: not a port of the host"} {
		if !strings.Contains(strings.Join(st.Warnings, "\n"), want) {
			t.Errorf("no warning containing %q in %q", want, st.Warnings)
		}
	}
}
