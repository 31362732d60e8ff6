package primary

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
)

func TestParseExportTo(t *testing.T) {
	cases := []struct {
		list  []string
		entry bool
		want  exportSet
		err   string
	}{
		{nil, false, everywhere, ""},
		{[]string{"*"}, false, everywhere, ""},
		{[]string{"."}, false, exportSet{ns: []string{"own"}}, ""},
		{[]string{"b", ".", "a"}, false, exportSet{ns: []string{"a", "b", "own"}}, ""},
		{[]string{"~"}, true, exportSet{}, ""},
		{[]string{"~"}, false, exportSet{}, "only allowed on a ServiceEntry"},
		{[]string{"~", "a"}, true, exportSet{}, "cannot be combined"},
		{[]string{"*", "a"}, false, exportSet{}, "cannot be combined"},
		{[]string{".", "own"}, false, exportSet{}, "duplicate entry (namespace own)"},
		{[]string{"a", "a"}, false, exportSet{}, "duplicate"},
		{[]string{"Not_A_Namespace"}, false, exportSet{}, "not a namespace name"},
	}
	for _, c := range cases {
		got, err := parseExportTo("own", c.list, c.entry)
		if c.err != "" {
			if err == nil || err.reason != ReasonInvalid || !strings.Contains(err.msg, c.err) {
				t.Errorf("%v: err %v; want invalid containing %q", c.list, err, c.err)
			}
			continue
		}
		if err != nil || !cmp.Equal(got, c.want, cmp.AllowUnexported(exportSet{})) {
			t.Errorf("%v: %+v, %v; want %+v", c.list, got, err, c.want)
		}
	}
	if s := (exportSet{ns: []string{"a", "c"}}); !s.admits("c") || s.admits("b") || !everywhere.admits("x") {
		t.Error("admits")
	}
}

// reviewsTo is a VirtualService in ns sending every reviews call to subset, exported as
// exportTo says (nil: no exportTo).
func reviewsTo(t testing.TB, name, ns, subset string, exportTo ...string) *networkingv1.VirtualService {
	y := "metadata: {name: " + name + ", namespace: " + ns + ", resourceVersion: \"1\"}\nspec:\n  hosts: [reviews.bookinfo.svc.cluster.local]\n"
	if len(exportTo) > 0 {
		y += "  exportTo: [\"" + strings.Join(exportTo, `", "`) + "\"]\n"
	}
	y += "  http:\n  - route:\n    - destination: {host: reviews.bookinfo.svc.cluster.local, subset: " + subset + "}\n"
	return mustVS(t, y)
}

// reviewsCluster returns the cluster the proxyless view of namespace ns sends reviews
// calls to.
func reviewsCluster(t *testing.T, b *Builder, v *View, ns string) string {
	t.Helper()
	res, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: ns})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	return routesOf(t, res)[0].GetRoute().GetCluster()
}

// TestExportToVirtualService: a public route, a namespace's private override and one
// exported to two other namespaces; each namespace's proxies get the routes exported to
// it, namespaces seeing the same objects share one plan and one memo.
func TestExportToVirtualService(t *testing.T) {
	r := bookinfoRegistry()
	vss := []*networkingv1.VirtualService{
		reviewsTo(t, "reviews", "bookinfo", "v1"), // no exportTo: everywhere
		reviewsTo(t, "reviews-canary", "canary", "v3", "."),
		reviewsTo(t, "reviews-qa", "qa", "v2", "team-a", "team-b"),
	}
	r.SetTrafficConfig(newTrafficConfig("cluster.local", vss, []*networkingv1.DestinationRule{mustDR(t, bookinfoDR)}))
	v := r.View()
	b := NewBuilder()
	want := map[string]string{
		"":         "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
		"bookinfo": "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
		"qa":       "outbound|9080|v1|reviews.bookinfo.svc.cluster.local", // exported to others only
		"other":    "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
		"canary":   "outbound|9080|v3|reviews.bookinfo.svc.cluster.local",
		"team-a":   "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
		"team-b":   "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
	}
	for _, ns := range mapsKeys(want) {
		if got := reviewsCluster(t, b, v, ns); got != want[ns] {
			t.Errorf("namespace %q routes reviews to %s; want %s", ns, got, want[ns])
		}
	}
	plans := b.trafficPlansFor(v)
	if len(plans.bySig) != 3 {
		t.Errorf("%d plans (%v); want 3: public, canary, team-a+team-b", len(plans.bySig), mapsKeys(plans.bySig))
	}
	a, _ := plans.forNamespace("team-a")
	bb, _ := plans.forNamespace("team-b")
	if a != bb {
		t.Error("team-a and team-b see the same objects but have different plans")
	}
	// ratings is planned alike everywhere: every plan's memo shares its resources.
	ka := b.memo[ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "exportTo:" + plans.sigOf["team-a"]}]
	kp := b.memo[ViewKey{Kind: ProxyGRPC, Network: "n1"}]
	if ka == nil || kp == nil || ka["ratings.bookinfo.svc.cluster.local"] != kp["ratings.bookinfo.svc.cluster.local"] {
		t.Error("ratings was built again for team-a's plan")
	}
	if ka["reviews.bookinfo.svc.cluster.local"] == kp["reviews.bookinfo.svc.cluster.local"] {
		t.Error("team-a shares the public reviews resources although its routes differ")
	}
	for _, st := range plans.public.status {
		if !st.Applied || len(st.Warnings) > 0 {
			t.Errorf("status %+v; want applied without warnings", st)
		}
	}
	if n := len(plans.public.status); n != 4 {
		t.Errorf("%d statuses; want 4 (one DR, three VSs)", n)
	}
}

// TestExportToPrecedence: two public VirtualServices for one host conflict; two private
// ones in different namespaces do not.
func TestExportToPrecedence(t *testing.T) {
	r := bookinfoRegistry()
	vss := []*networkingv1.VirtualService{
		reviewsTo(t, "a", "bookinfo", "v1"),
		reviewsTo(t, "b", "bookinfo", "v2", "*"),
		reviewsTo(t, "c", "ns1", "v3", "."),
		reviewsTo(t, "d", "ns2", "v2", "."),
	}
	r.SetTrafficConfig(newTrafficConfig("cluster.local", vss, []*networkingv1.DestinationRule{mustDR(t, bookinfoDR)}))
	v := r.View()
	b := NewBuilder()
	got := map[string]ConfigStatus{}
	for _, st := range b.trafficPlanFor(v).status {
		got[st.Name] = st
	}
	if st := got["b"]; st.Applied || st.Reason != ReasonConflict || !strings.Contains(st.Message, "bookinfo/a") {
		t.Errorf("second public VS: %+v; want conflict with bookinfo/a", st)
	}
	for _, n := range []string{"a", "c", "d"} {
		if !got[n].Applied {
			t.Errorf("VS %s: %+v; want applied", n, got[n])
		}
	}
	for ns, sub := range map[string]string{"ns1": "v3", "ns2": "v2", "x": "v1"} {
		if c := reviewsCluster(t, b, v, ns); c != "outbound|9080|"+sub+"|reviews.bookinfo.svc.cluster.local" {
			t.Errorf("namespace %s: %s; want subset %s", ns, c, sub)
		}
	}
}

// drFor is a DestinationRule for reviews in ns with a load-balancing policy.
func drFor(t testing.TB, name, ns, lb string, exportTo ...string) *networkingv1.DestinationRule {
	y := "metadata: {name: " + name + ", namespace: " + ns + ", resourceVersion: \"1\"}\nspec:\n  host: reviews.bookinfo.svc.cluster.local\n"
	if len(exportTo) > 0 {
		y += "  exportTo: [\"" + strings.Join(exportTo, `", "`) + "\"]\n"
	}
	y += "  trafficPolicy: {loadBalancer: {simple: " + lb + "}}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n"
	return mustDR(t, y)
}

// reviewsLB returns the Envoy sidecar view's LB policy of reviews' cluster in namespace
// ns, and whether the view has the v1 subset's cluster.
func reviewsLB(t *testing.T, b *Builder, v *View, ns string) (string, bool) {
	t.Helper()
	res, err := b.Build(v, ViewKey{Kind: ProxySidecar, Network: "n1", Namespace: ns})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	lb, sub := "", false
	for _, c := range res[resource.ClusterType] {
		switch cache.GetResourceName(c) {
		case "outbound|9080||reviews.bookinfo.svc.cluster.local":
			lb = c.(*cluster.Cluster).GetLbPolicy().String()
		case "outbound|9080|v1|reviews.bookinfo.svc.cluster.local":
			sub = true
		}
	}
	return lb, sub
}

// TestExportToDestinationRule: Istio's lookup (proxy namespace, host namespace, root
// namespace), a rule in a third namespace applying only there, a private rule invisible
// elsewhere, and what configz says about each.
func TestExportToDestinationRule(t *testing.T) {
	drs := []*networkingv1.DestinationRule{
		drFor(t, "svc", "bookinfo", "LEAST_REQUEST"),
		drFor(t, "mine", "team-a", "RANDOM", "."),
		drFor(t, "mesh", "istio-system", "ROUND_ROBIN"),
		drFor(t, "far", "x", "RANDOM"), // exported everywhere, but only x looks in x
	}
	check := func(drs []*networkingv1.DestinationRule, want map[string]string) *trafficPlans {
		t.Helper()
		r := bookinfoRegistry()
		r.SetTrafficConfig(newTrafficConfig("cluster.local", nil, drs))
		v := r.View()
		b := NewBuilder()
		for _, ns := range mapsKeys(want) {
			if lb, _ := reviewsLB(t, b, v, ns); lb != want[ns] {
				t.Errorf("namespace %q: reviews LB %s; want %s", ns, lb, want[ns])
			}
		}
		return b.trafficPlansFor(v)
	}
	plans := check(drs, map[string]string{"": "LEAST_REQUEST", "bookinfo": "LEAST_REQUEST", "other": "LEAST_REQUEST",
		"team-a": "RANDOM", "istio-system": "ROUND_ROBIN", "x": "RANDOM"})
	for _, st := range plans.public.status {
		if !st.Applied {
			t.Errorf("%+v: want applied", st)
		}
		if hasFar := slices.ContainsFunc(st.Warnings, func(w string) bool { return strings.Contains(w, "applies only to proxies in namespace x") }); hasFar != (st.Name == "far") {
			t.Errorf("%s warnings %q", st.Name, st.Warnings)
		}
	}
	// Without the host namespace's rule, the root namespace's is everyone's default.
	check(drs[1:], map[string]string{"other": "ROUND_ROBIN", "bookinfo": "ROUND_ROBIN", "team-a": "RANDOM"})

	// A private rule is invisible elsewhere: a public VirtualService using its subset is
	// applied for bookinfo's proxies and refused (not half-applied) for the others.
	r := bookinfoRegistry()
	r.SetTrafficConfig(newTrafficConfig("cluster.local",
		[]*networkingv1.VirtualService{reviewsTo(t, "reviews", "bookinfo", "v1")},
		[]*networkingv1.DestinationRule{drFor(t, "svc", "bookinfo", "LEAST_REQUEST", ".")}))
	v := r.View()
	b := NewBuilder()
	if c := reviewsCluster(t, b, v, "bookinfo"); c != "outbound|9080|v1|reviews.bookinfo.svc.cluster.local" {
		t.Errorf("bookinfo: %s; want subset v1", c)
	}
	if c := reviewsCluster(t, b, v, "other"); c != "outbound|9080||reviews.bookinfo.svc.cluster.local" {
		t.Errorf("other: %s; want the default route", c)
	}
	if lb, sub := reviewsLB(t, b, v, "other"); lb != "ROUND_ROBIN" || sub {
		t.Errorf("other namespace: LB %s, v1 subset %v; want neither of the private rule", lb, sub)
	}
	for _, st := range b.trafficPlanFor(v).status {
		if st.Kind != KindVirtualService {
			continue
		}
		if !st.Applied || len(st.Warnings) != 1 || !strings.Contains(st.Warnings[0], "not applied for proxies in every other namespace: unknown_subset") {
			t.Errorf("VS status %+v; want applied, with a warning about the other namespaces", st)
		}
	}
	// Two rules of one namespace that the same proxies see conflict; with disjoint
	// exportTo they do not.
	statuses := func(drs ...*networkingv1.DestinationRule) map[string]ConfigStatus {
		r.SetTrafficConfig(newTrafficConfig("cluster.local", nil, drs))
		got := map[string]ConfigStatus{}
		for _, st := range NewBuilder().trafficPlanFor(r.View()).status {
			got[st.Name] = st
		}
		return got
	}
	got := statuses(drFor(t, "a", "bookinfo", "LEAST_REQUEST"), drFor(t, "b", "bookinfo", "RANDOM"))
	if !got["a"].Applied || got["b"].Reason != ReasonConflict || !strings.Contains(got["b"].Message, "bookinfo/a") {
		t.Errorf("two public rules: %+v; want b a conflict with a", got)
	}
	got = statuses(drFor(t, "c", "bookinfo", "RANDOM", "."), drFor(t, "d", "bookinfo", "RANDOM", "team-z"), drFor(t, "e", "bookinfo", "RANDOM", "team-y", "team-z"))
	// e's home is team-y (the first namespace it names), where it applies; team-z sees d
	// first, and configz says so.
	if !got["c"].Applied || !got["d"].Applied || !got["e"].Applied || !slices.ContainsFunc(got["e"].Warnings, func(w string) bool {
		return strings.Contains(w, "not applied for proxies in namespace team-z: conflict: host reviews.bookinfo.svc.cluster.local already has DestinationRule bookinfo/d")
	}) {
		t.Errorf("rules with disjoint exportTo: %+v; want c, d, e applied, e with a warning about team-z", got)
	}
}

// TestExportToServiceEntry: an entry exported to its own namespace is a service there
// only; "~" hides it from every namespace; a VirtualService naming a host it does not see
// is unknown_host for that namespace.
func TestExportToServiceEntry(t *testing.T) {
	se := strings.Replace(externalSE, "spec:\n", "spec:\n  exportTo: [\".\"]\n", 1)
	none := strings.Replace(internalSE, "spec:\n", "spec:\n  exportTo: [\"~\"]\n", 1)
	r := bookinfoRegistry()
	ep := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, se), mustSE(t, none)}, nil)
	r.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: "c1"}, ep.shard)
	vs := mustVS(t, "metadata: {name: pay, namespace: web}\nspec:\n  hosts: [api.payments.example.com]\n  http:\n  - route:\n    - destination: {host: api.payments.example.com}\n")
	tc := newTrafficConfig("cluster.local", []*networkingv1.VirtualService{vs}, nil)
	tc.ServiceEntries, tc.entryExports = ep.status, ep.exports
	r.SetTrafficConfig(tc)
	v := r.View()
	b := NewBuilder()
	has := func(ns, host string) bool {
		res, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: ns})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Validate(); err != nil {
			t.Fatal(err)
		}
		return slices.ContainsFunc(res[resource.ListenerType], func(l types.Resource) bool { return strings.HasPrefix(cache.GetResourceName(l), host+":") })
	}
	if !has("shop", "api.payments.example.com") || has("web", "api.payments.example.com") || has("", "api.payments.example.com") {
		t.Error("api.payments.example.com (exportTo .) must be in shop's view only")
	}
	for _, ns := range []string{"shop", "web", ""} {
		if has(ns, "ledger.vm.internal") {
			t.Errorf("ledger.vm.internal (exportTo ~) is in %q's view", ns)
		}
	}
	for _, st := range b.trafficPlanFor(v).status {
		if st.Kind == KindVirtualService && (st.Applied || st.Reason != ReasonUnknownHost) {
			t.Errorf("VS naming a host its namespace does not see: %+v; want unknown_host", st)
		}
		if st.Kind == KindServiceEntry && !st.Applied {
			t.Errorf("entry refused: %+v", st)
		}
	}
	bad := strings.Replace(externalSE, "spec:\n", "spec:\n  exportTo: [\"*\", \"shop\"]\n", 1)
	if st := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, bad)}, nil).status[0]; st.Applied || st.Reason != ReasonInvalid {
		t.Errorf("bad exportTo: %+v; want invalid", st)
	}
}

// TestExportToGolden pins a namespace's view with a private route override
// (testdata/exportto-grpc.golden; rewrite with -update).
func TestExportToGolden(t *testing.T) {
	r := bookinfoRegistry()
	r.SetTrafficConfig(newTrafficConfig("cluster.local", []*networkingv1.VirtualService{
		reviewsTo(t, "reviews", "bookinfo", "v1"), reviewsTo(t, "reviews-canary", "canary", "v3", "."),
	}, []*networkingv1.DestinationRule{mustDR(t, bookinfoDR)}))
	key := ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "canary"}
	res, err := BuildResources(r.View(), key)
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
	path := filepath.Join("testdata", "exportto-grpc.golden")
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
		t.Errorf("%s differs (-want +got):\n%s", path, d)
	}
}

// mapsKeys returns m's keys.
func mapsKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
