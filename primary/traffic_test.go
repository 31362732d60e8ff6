package primary

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// The bookinfo-style pair the golden files show, written from Istio's traffic-management
// documentation: reviews has three versions; a signed-in user "jason" goes to v2, requests
// under /api/ or matching a regex are split 90/10 between v1 and v3 (the canary route,
// with a timeout and retries), "x-chaos: on" gets injected delays and aborts, and
// everything else goes to v1. The rule picks least-request balancing, with v3 overriding it.
const (
	bookinfoDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo, resourceVersion: "7"}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
`
	bookinfoVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo, resourceVersion: "8"}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - name: canary
    match:
    - uri: {prefix: /api/}
    - uri: {regex: "/reviews/[0-9]+"}
      headers:
        x-canary: {prefix: "yes"}
    route:
    - destination: {host: reviews.bookinfo.svc.cluster.local, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3, port: {number: 9080}}
      weight: 10
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "unavailable,connect-failure,503"}
  - name: chaos
    match:
    - headers:
        x-chaos: {exact: "on"}
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 50}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - destination: {host: reviews, subset: v1}
`
)

func mustVS(t testing.TB, y string) *networkingv1.VirtualService {
	t.Helper()
	vs := &networkingv1.VirtualService{}
	if err := yaml.Unmarshal([]byte(y), vs); err != nil {
		t.Fatal(err)
	}
	return vs
}

func mustDR(t testing.TB, y string) *networkingv1.DestinationRule {
	t.Helper()
	dr := &networkingv1.DestinationRule{}
	if err := yaml.Unmarshal([]byte(y), dr); err != nil {
		t.Fatal(err)
	}
	return dr
}

// bookinfoRegistry has reviews v1 and v2 on network n1 and v3 on n2 (behind n2's
// gateway), and ratings with two ports.
func bookinfoRegistry() *Registry {
	r := NewRegistry()
	reviews := mesh.ServiceKey{Namespace: "bookinfo", Name: "reviews"}
	ratings := mesh.ServiceKey{Namespace: "bookinfo", Name: "ratings"}
	httpPort := ServicePort{Name: "http", Port: 9080, Protocol: mesh.ProtocolHTTP}
	rep := func(addr string, c mesh.ClusterID, n mesh.NetworkID, version string) mesh.Endpoint {
		return mesh.Endpoint{
			Address: netip.MustParseAddr(addr), Cluster: c, Network: n, MTLSReady: true, Health: mesh.HealthHealthy,
			Ports:    []mesh.Port{{Name: "http", Number: 9080, Protocol: mesh.ProtocolHTTP}},
			Locality: mesh.Locality{Region: "r", Zone: string(c)},
			Labels:   map[string]string{"app": "reviews", "version": version},
		}
	}
	c1, c2 := ShardKey{SourceKubernetes, "c1"}, ShardKey{SourceKubernetes, "c2"}
	svc := &Service{Hostname: reviews.Hostname(""), Key: reviews, VIP: netip.MustParseAddr("10.96.1.1"), Ports: []ServicePort{httpPort}}
	r.UpdateService(c1, svc.Hostname, svc, []mesh.Endpoint{rep("10.1.1.1", "c1", "n1", "v1"), rep("10.1.1.2", "c1", "n1", "v2")})
	r.UpdateService(c2, svc.Hostname, svc, []mesh.Endpoint{rep("10.2.1.3", "c2", "n2", "v3")})
	r.UpdateService(c1, ratings.Hostname(""), &Service{Hostname: ratings.Hostname(""), Key: ratings, VIP: netip.MustParseAddr("10.96.1.2"),
		Ports: []ServicePort{httpPort, {Name: "http-admin", Port: 9090, Protocol: mesh.ProtocolHTTP}}}, nil)
	r.UpdateGateways(c2, []Gateway{gw("n2", "192.0.2.2")})
	return r
}

func bookinfoView(t testing.TB, vss []string, drs []string) *View {
	r := bookinfoRegistry()
	var vs []*networkingv1.VirtualService
	var dr []*networkingv1.DestinationRule
	for _, y := range vss {
		vs = append(vs, mustVS(t, y))
	}
	for _, y := range drs {
		dr = append(dr, mustDR(t, y))
	}
	r.SetTrafficConfig(newTrafficConfig("cluster.local", vs, dr))
	return r.View()
}

// TestTrafficGolden compares the translated xDS of the bookinfo pair with
// testdata/traffic-<kind>.golden (rewrite with -update, as TestBuilderGolden).
func TestTrafficGolden(t *testing.T) {
	v := bookinfoView(t, []string{bookinfoVS}, []string{bookinfoDR})
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Fatalf("bookinfo object refused: %+v", st)
		}
	}
	for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1"}, {Kind: ProxyGateway, Network: "n2"}} {
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
			path := filepath.Join("testdata", "traffic-"+string(key.Kind)+".golden")
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
				t.Errorf("traffic output for %s differs from %s (-want +got):\n%s", key, path, d)
			}
		})
	}
}

// TestTrafficSubsets checks the parts of the translation the golden files show in bulk:
// subset clusters select endpoints by label, across networks through the gateway with the
// subset in the SNI, and the policy is per client kind.
func TestTrafficSubsets(t *testing.T) {
	v := bookinfoView(t, []string{bookinfoVS}, []string{bookinfoDR})
	res, err := BuildResources(v, ViewKey{Kind: ProxyGRPC, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	cla := map[string][]string{}
	for _, r := range res[resource.EndpointType] {
		a := r.(*endpoint.ClusterLoadAssignment)
		for _, l := range a.Endpoints {
			for _, e := range l.LbEndpoints {
				cla[a.ClusterName] = append(cla[a.ClusterName], e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
			}
		}
	}
	want := map[string][]string{
		"outbound|9080||reviews.bookinfo.svc.cluster.local":   {"10.1.1.1", "10.1.1.2", "192.0.2.2"},
		"outbound|9080|v1|reviews.bookinfo.svc.cluster.local": {"10.1.1.1"},
		"outbound|9080|v2|reviews.bookinfo.svc.cluster.local": {"10.1.1.2"},
		"outbound|9080|v3|reviews.bookinfo.svc.cluster.local": {"192.0.2.2"}, // v3 lives on n2
	}
	for name, addrs := range want {
		if d := cmp.Diff(addrs, cla[name]); d != "" {
			t.Errorf("%s endpoints (-want +got):\n%s", name, d)
		}
	}
	lb := map[string]cluster.Cluster_LbPolicy{}
	for _, r := range res[resource.ClusterType] {
		c := r.(*cluster.Cluster)
		lb[c.Name] = c.LbPolicy
	}
	if lb["outbound|9080|v1|reviews.bookinfo.svc.cluster.local"] != cluster.Cluster_LEAST_REQUEST ||
		lb["outbound|9080|v3|reviews.bookinfo.svc.cluster.local"] != cluster.Cluster_ROUND_ROBIN {
		t.Errorf("lb policies: %v", lb)
	}
	gwRes, err := BuildResources(v, ViewKey{Kind: ProxyGateway, Network: "n2"})
	if err != nil {
		t.Fatal(err)
	}
	var snis []string
	for _, r := range gwRes[resource.ListenerType] {
		for _, fc := range r.(*listener.Listener).FilterChains {
			snis = append(snis, fc.GetFilterChainMatch().GetServerNames()...)
		}
	}
	if !strings.Contains(strings.Join(snis, " "), "outbound_.9080_.v3_.reviews.bookinfo.svc.cluster.local") {
		t.Errorf("gateway server names lack the v3 subset: %v", snis)
	}
}

// routesOf returns the routes a proxyless client gets for reviews:9080.
func routesOf(t *testing.T, res Resources) []*route.Route {
	t.Helper()
	for _, r := range res[resource.ListenerType] {
		l := r.(*listener.Listener)
		if l.Name != "reviews.bookinfo.svc.cluster.local:9080" {
			continue
		}
		m := &hcm.HttpConnectionManager{}
		if err := l.ApiListener.ApiListener.UnmarshalTo(m); err != nil {
			t.Fatal(err)
		}
		return m.GetRouteConfig().VirtualHosts[0].Routes
	}
	t.Fatal("no reviews listener")
	return nil
}

// TestTrafficBadConfig checks that each kind of bad object is refused whole, with its
// reason, while every other object keeps being applied.
func TestTrafficBadConfig(t *testing.T) {
	vs := func(name, http string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: " + name + ", namespace: bookinfo}\nspec:\n  hosts: [ratings]\n  http:\n" + http
	}
	const good = "  - route:\n    - destination: {host: ratings, port: {number: 9090}}\n"
	cases := []struct {
		name, vs, dr, reason, msg string
	}{
		{"unknown host", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  hosts: [details]\n  http:\n" + good,
			"", ReasonUnknownHost, "details.bookinfo.svc.cluster.local: no such service"},
		{"unknown destination host", vs("bad", "  - route:\n    - destination: {host: productpage}\n"), "", ReasonUnknownHost, "http[0].route[0].destination.host productpage.bookinfo"},
		{"unknown subset", vs("bad", "  - route:\n    - destination: {host: reviews, subset: v9}\n"), "", ReasonUnknownSubset, `subset "v9"`},
		{"bad uri regex", vs("bad", "  - match:\n    - uri: {regex: \"/(a\"}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonBadRegex, "http[0].match[0].uri.regex"},
		{"bad header regex", vs("bad", "  - match:\n    - headers: {x-a: {regex: \"[\"}}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonBadRegex, "headers[x-a].regex"},
		{"weights do not sum to 100", vs("bad", "  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: 50\n    - destination: {host: reviews, subset: v2}\n      weight: 40\n"), "", ReasonBadWeights, "weights sum to 90"},
		{"unknown port", vs("bad", "  - route:\n    - destination: {host: ratings, port: {number: 1}}\n"), "", ReasonUnknownPort, "port 1"},
		{"unknown retry condition", vs("bad", "  - retries: {attempts: 2, retryOn: \"unavailable,sometimes\"}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonInvalid, `retryOn "sometimes"`},
		{"negative retry attempts", vs("bad", "  - retries: {attempts: -1}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonInvalid, "attempts -1"},
		{"unknown gRPC status in a fault", vs("bad", "  - fault: {abort: {grpcStatus: SOMETIMES}}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonInvalid, `grpcStatus "SOMETIMES"`},
		{"fault percentage over 100", vs("bad", "  - fault: {abort: {httpStatus: 503, percentage: {value: 150}}}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonInvalid, "percentage 150"},
		{"unsupported match", vs("bad", "  - match:\n    - method: {exact: GET}\n    route:\n    - destination: {host: ratings, port: {number: 9080}}\n"), "", ReasonUnsupported, "only uri and headers"},
		{"second VS for a host", vs("zz-second", good), "", ReasonConflict, "already routed by VirtualService bookinfo/ratings"},
		{"DR for an unknown host", "", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  host: details\n", ReasonUnknownHost, "details.bookinfo.svc.cluster.local"},
		{"DR with PASSTHROUGH", "", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  host: ratings\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n", ReasonUnsupported, "PASSTHROUGH"},
	}
	baseline := func(extraVS, extraDR string) *View {
		vss := []string{bookinfoVS, vs("ratings", good)}
		drs := []string{bookinfoDR}
		if extraVS != "" {
			vss = append(vss, extraVS)
		}
		if extraDR != "" {
			drs = append(drs, extraDR)
		}
		return bookinfoView(t, vss, drs)
	}
	okView := baseline("", "")
	okRes, err := BuildResources(okView, ViewKey{Kind: ProxyGRPC, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := baseline(tc.vs, tc.dr)
			plan := planTraffic(v)
			var bad *ConfigStatus
			for i, st := range plan.status {
				switch {
				case st.Name == "bad" || st.Name == "zz-second":
					bad = &plan.status[i]
				case !st.Applied:
					t.Errorf("a good object was refused too: %+v", st)
				}
			}
			if bad == nil || bad.Applied || bad.Reason != tc.reason || !strings.Contains(bad.Message, tc.msg) {
				t.Fatalf("status %+v; want refused with %s, message containing %q", bad, tc.reason, tc.msg)
			}
			res, err := BuildResources(v, ViewKey{Kind: ProxyGRPC, Network: "n1"})
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
			// Nothing of the refused object is applied: the output is the baseline's.
			for _, typ := range []resource.Type{resource.ClusterType, resource.ListenerType} {
				if d := cmp.Diff(names(okRes[typ]), names(res[typ])); d != "" {
					t.Errorf("%s differ from the baseline:\n%s", typ, d)
				}
			}
			if d := cmp.Diff(len(routesOf(t, okRes)), len(routesOf(t, res))); d != "" {
				t.Errorf("reviews routes changed: %s", d)
			}
		})
	}
}

func names(rs []types.Resource) []string {
	var out []string
	for _, r := range rs {
		out = append(out, cache.GetResourceName(r))
	}
	return out
}

// TestTrafficConfigzCountsOnce checks the rejection metric counts an object version once.
func TestTrafficConfigzCountsOnce(t *testing.T) {
	c, err := newConfigState(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	st := []ConfigStatus{{Kind: KindVirtualService, Namespace: "a", Name: "b", ResourceVersion: "1", Reason: ReasonBadRegex}}
	c.record(st)
	c.record(st)
	st[0].ResourceVersion = "2"
	c.record(st)
	if got := testutil.ToFloat64(c.rejected.WithLabelValues(KindVirtualService, ReasonBadRegex)); got != 2 {
		t.Fatalf("rejected_total = %v, want 2 (two versions)", got)
	}
}

// TestTrafficMemo checks that a config change rebuilds only the hosts it touches.
func TestTrafficMemo(t *testing.T) {
	r := bookinfoRegistry()
	r.SetTrafficConfig(newTrafficConfig("cluster.local", []*networkingv1.VirtualService{mustVS(t, bookinfoVS)}, []*networkingv1.DestinationRule{mustDR(t, bookinfoDR)}))
	b := NewBuilder()
	key := ViewKey{Kind: ProxyGRPC, Network: "n1"}
	first, err := b.Build(r.View(), key)
	if err != nil {
		t.Fatal(err)
	}
	vs2 := mustVS(t, strings.Replace(bookinfoVS, `resourceVersion: "8"`, `resourceVersion: "9"`, 1))
	r.SetTrafficConfig(newTrafficConfig("cluster.local", []*networkingv1.VirtualService{vs2}, []*networkingv1.DestinationRule{mustDR(t, bookinfoDR)}))
	second, err := b.Build(r.View(), key)
	if err != nil {
		t.Fatal(err)
	}
	same := func(typ resource.Type, name string) bool {
		for i, x := range first[typ] {
			if cache.GetResourceName(x) == name {
				return second[typ][i] == x
			}
		}
		t.Fatalf("no %s %s", typ, name)
		return false
	}
	if !same(resource.ListenerType, "ratings.bookinfo.svc.cluster.local:9080") {
		t.Error("ratings was rebuilt although no config touches it")
	}
	if same(resource.ListenerType, "reviews.bookinfo.svc.cluster.local:9080") {
		t.Error("reviews was not rebuilt after its VirtualService changed")
	}
}
