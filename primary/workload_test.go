package primary

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	gocmp "github.com/google/go-cmp/cmp"
)

// selectorSidecars are, oldest first: the mesh default (each proxy's own namespace), demo's
// namespace Sidecar (demo only, plus web's route to cart), a selector Sidecar for
// app=narrow (istio-system only), one for app=inherit without egress, a newer one that
// overlaps app=narrow, and a selector Sidecar in the root namespace.
var selectorSidecars = []string{
	`{metadata: {name: default, namespace: istio-system}, spec: {egress: [{hosts: ["./*"]}]}}`,
	`{metadata: {name: default, namespace: demo}, spec: {egress: [{hosts: ["./*"]}]}}`,
	`{metadata: {name: narrow, namespace: demo}, spec: {workloadSelector: {labels: {app: narrow}}, egress: [{hosts: ["istio-system/*"]}]}}`,
	`{metadata: {name: inherit, namespace: demo}, spec: {workloadSelector: {labels: {app: inherit}}}}`,
	`{metadata: {name: narrow-too, namespace: demo}, spec: {workloadSelector: {labels: {tier: x}}, egress: [{hosts: ["shop/*"]}]}}`,
	`{metadata: {name: root-pods, namespace: istio-system}, spec: {workloadSelector: {labels: {app: telemetry}}, egress: [{hosts: ["demo/*"]}]}}`,
}

// TestSidecarSelectorPrecedence checks Istio's order for one proxy (selector Sidecar of
// its namespace, then the namespace's, then the root namespace's), matching (every
// selector label, own namespace only), the oldest of two matching selectors applying with
// a warning on the newer, and a root namespace selector never being the mesh default.
func TestSidecarSelectorPrecedence(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, selectorSidecars...)
	v := r.View()
	b := NewBuilder()
	plan := b.trafficPlanFor(v)
	for _, st := range plan.status {
		if !st.Applied {
			t.Fatalf("refused: %+v", st)
		}
		warned := slices.ContainsFunc(st.Warnings, func(w string) bool { return strings.Contains(w, "demo/narrow, which is older") })
		if warned != (st.Name == "narrow-too") {
			t.Errorf("%s/%s warnings %q", st.Namespace, st.Name, st.Warnings)
		}
	}
	sp := plan.sidecars
	for _, c := range []struct {
		ns     string
		labels map[string]string
		want   string
	}{
		{"demo", map[string]string{"app": "narrow", "tier": "x"}, "narrow"}, // both select it: the oldest
		{"demo", map[string]string{"app": "narrow", "v": "1"}, "narrow"},
		{"demo", map[string]string{"tier": "x"}, "narrow-too"},
		{"demo", map[string]string{"app": "inherit"}, "inherit"},
		{"demo", map[string]string{"app": "web"}, ""},
		{"demo", nil, ""},
		{"shop", map[string]string{"app": "narrow"}, ""}, // another namespace's selector never applies
		{"istio-system", map[string]string{"app": "telemetry"}, "root-pods"},
		{"", map[string]string{"app": "narrow"}, ""},
	} {
		if got := sp.workloadFor(c.ns, c.labels); got != c.want {
			t.Errorf("workloadFor(%s, %v) = %q, want %q", c.ns, c.labels, got, c.want)
		}
	}
	key := func(ns, wl string) ViewKey {
		return ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: ns, Workload: wl}
	}
	for _, c := range []struct {
		key  ViewKey
		want []string
	}{
		{key("demo", ""), []string{"cart.shop", "echo.demo", "web.demo"}},
		{key("demo", "narrow"), []string{"telemetry.istio-system"}},
		{key("demo", "narrow-too"), []string{"cart.shop"}},
		{key("demo", "inherit"), []string{"cart.shop", "echo.demo", "web.demo"}}, // no egress: the namespace's
		{key("demo", "deleted-since"), []string{"cart.shop", "echo.demo", "web.demo"}},
		{key("shop", ""), []string{"cart.shop"}}, // the mesh default, not root-pods
		{key("istio-system", "root-pods"), []string{"echo.demo", "web.demo", "cart.shop"}},
		{key("istio-system", ""), []string{"telemetry.istio-system"}},
	} {
		got := listenerNames(t, b, v, c.key)
		slices.Sort(got)
		slices.Sort(c.want)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.key, got, c.want)
		}
	}
	// A namespace with only a selector Sidecar: the pods it does not select see everything.
	r2 := scopeRegistry(t)
	setSidecars(t, r2, selectorSidecars[2])
	if got := listenerNames(t, NewBuilder(), r2.View(), key("demo", "")); len(got) != 4 {
		t.Errorf("demo without a selected pod: %v, want all 4", got)
	}
}

// TestSidecarSelectorInert checks that without Sidecars with workloadSelector the plan
// has none, so no key ever gets a Workload part and rekey is skipped.
func TestSidecarSelectorInert(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, selectorSidecars[0], selectorSidecars[1])
	sp := NewBuilder().trafficPlanFor(r.View()).sidecars
	if sp.anySelectors() || sp.hasSelectors("demo") || sp.workloadFor("demo", map[string]string{"app": "narrow"}) != "" {
		t.Fatal("selector-less Sidecars produced selectors")
	}
	var none *sidecarPlan
	if none.anySelectors() || none.workloadFor("demo", nil) != "" || none.scopeForKey("demo", "x") != nil {
		t.Fatal("a nil plan scopes")
	}
}

// TestViewKeyWorkload checks the ":workload" part of the key's string form both ways,
// and that keys without it print as before.
func TestViewKeyWorkload(t *testing.T) {
	for _, s := range []string{"grpc/net-1~demo:narrow", "sidecar/n1@r/z~demo:a.b-c", "grpc/net-1~demo", "ingress/n1#app=gw", "grpc/"} {
		k, err := ParseViewKey(s)
		if err != nil {
			t.Fatal(err)
		}
		if k.String() != s {
			t.Errorf("%q parsed to %+v, prints %q", s, k, k)
		}
	}
	k, _ := ParseViewKey("grpc/net-1~demo:narrow")
	if k.Namespace != "demo" || k.Workload != "narrow" {
		t.Errorf("%+v", k)
	}
}

// TestSidecarSelectorMemoShared checks that a selector view and its namespace's view
// share one service's resources (the memo ignores Workload), so a selector Sidecar adds
// a marshal per view, not a build per service.
func TestSidecarSelectorMemoShared(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, selectorSidecars[2])
	v := r.View()
	b := NewBuilder()
	narrow, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo", Workload: "narrow"})
	if err != nil {
		t.Fatal(err)
	}
	full, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo", Workload: "narrow"})
	if err != nil {
		t.Fatal(err)
	}
	if len(narrow[resource.ClusterType]) != 1 || len(full[resource.ClusterType]) != 4 {
		t.Fatalf("clusters: narrow %d, full %d", len(narrow[resource.ClusterType]), len(full[resource.ClusterType]))
	}
	if narrow[resource.ClusterType][0] != again[resource.ClusterType][0] || !slices.Contains(full[resource.ClusterType], narrow[resource.ClusterType][0]) {
		t.Error("the telemetry cluster was rebuilt instead of shared between the views")
	}
	if len(b.memo) != 1 {
		t.Errorf("memo has %d entries, want 1 (one per kind, network and locality)", len(b.memo))
	}
}

// TestViewCacheRekey checks that a parked watch whose node's key changes moves to the new
// view (announced), is answered by that view's SetView and not by the old one's, that its
// cancel still removes it after the move, and that nothing moves when keys are unchanged.
func TestViewCacheRekey(t *testing.T) {
	var announced []ViewKey
	c := newViewCache(func(k ViewKey) { announced = append(announced, k) })
	workload := ""
	c.keyOf = func(n *core.Node) (ViewKey, error) {
		k, err := viewKeyOf(n)
		k.Workload = workload
		return k, err
	}
	old, moved := ViewKey{Kind: ProxyGRPC}, ViewKey{Kind: ProxyGRPC, Workload: "narrow"}
	if err := c.SetView(old, twoServices(t, 1)); err != nil {
		t.Fatal(err)
	}
	ch := make(chan cache.Response, 2)
	req := &discovery.DiscoveryRequest{Node: grpcNode("sidecar~1"), TypeUrl: resource.EndpointType, ResourceNames: []string{edsA}}
	sub := stream.NewSotwSubscription(req.ResourceNames, false)
	if _, err := c.CreateWatch(req, sub, ch); err != nil {
		t.Fatal(err)
	}
	resp, _ := (<-ch).GetDiscoveryResponse()
	ack := &discovery.DiscoveryRequest{Node: req.Node, TypeUrl: req.TypeUrl, ResourceNames: req.ResourceNames, VersionInfo: resp.VersionInfo}
	cancel, err := c.CreateWatch(ack, sub, ch) // parked in old
	if err != nil {
		t.Fatal(err)
	}
	if n := c.rekey(func(ViewKey) bool { return true }); n != 0 {
		t.Fatalf("rekey moved %d watches with unchanged keys", n)
	}
	workload = "narrow"
	if n := c.rekey(func(ViewKey) bool { return true }); n != 1 || !slices.Contains(announced, moved) {
		t.Fatalf("rekey moved %d, announced %v", n, announced)
	}
	if err := c.SetView(old, twoServices(t, 5)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		t.Fatalf("the old view answered a moved watch: %v", r)
	default:
	}
	if err := c.SetView(moved, twoServices(t, 9)); err != nil {
		t.Fatal(err)
	}
	mr, _ := (<-ch).GetDiscoveryResponse()
	if len(mr.Resources) != 1 || mr.VersionInfo == resp.VersionInfo {
		t.Fatalf("moved watch answer: %v", mr)
	}
	// A watch parked in the new view, moved back, then cancelled, is gone from both.
	r2 := &discovery.DiscoveryRequest{Node: req.Node, TypeUrl: req.TypeUrl, ResourceNames: req.ResourceNames, VersionInfo: mr.VersionInfo}
	cancel()
	cancel, err = c.CreateWatch(r2, sub, ch)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		t.Fatalf("an up-to-date watch was answered: %v", r)
	default:
	}
	workload = ""
	if n := c.rekey(func(ViewKey) bool { return true }); n != 1 {
		t.Fatalf("moving back: rekey moved %d", n)
	}
	cancel()
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, v := range c.views {
		if len(v.sotw)+len(v.deltas) != 0 {
			t.Errorf("view %s still has watches", k)
		}
	}
	if len(c.watchAt) != 0 {
		t.Errorf("watchAt: %v", c.watchAt)
	}
}

// TestSidecarSelectorGolden pins the proxyless view of a demo pod that a Sidecar with
// workloadSelector scopes to shop, over demo's own namespace Sidecar
// (testdata/sidecarscope-selector-grpc.golden; rewrite with -update).
func TestSidecarSelectorGolden(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, `
metadata: {name: default, namespace: demo}
spec:
  egress:
  - hosts: ["./echo.demo.svc.cluster.local", "istio-system/*"]
`, `
metadata: {name: narrow, namespace: demo}
spec:
  workloadSelector: {labels: {app: web}}
  egress:
  - hosts: ["shop/*"]
`)
	key := ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo", Workload: "narrow"}
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
	path := filepath.Join("testdata", "sidecarscope-selector-grpc.golden")
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
	if d := gocmp.Diff(string(want), string(got)); d != "" {
		t.Errorf("selector-scoped view differs from %s (-want +got):\n%s", path, d)
	}
}
