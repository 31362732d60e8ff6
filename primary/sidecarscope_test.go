package primary

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	gocmp "github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/structpb"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func mustSidecar(t testing.TB, y string) *networkingv1.Sidecar {
	t.Helper()
	sc := &networkingv1.Sidecar{}
	if err := yaml.UnmarshalStrict([]byte(y), sc); err != nil {
		t.Fatal(err)
	}
	return sc
}

// scopeRegistry holds services in three namespaces: demo/echo, demo/web, shop/cart,
// istio-system/telemetry, and a VirtualService routing demo/web to shop/cart.
func scopeRegistry(t testing.TB) *Registry {
	t.Helper()
	r := NewRegistry()
	c1 := ShardKey{SourceKubernetes, "c1"}
	for i, k := range []mesh.ServiceKey{{Namespace: "demo", Name: "echo"}, {Namespace: "demo", Name: "web"}, {Namespace: "shop", Name: "cart"}, {Namespace: "istio-system", Name: "telemetry"}} {
		svc := &Service{Hostname: k.Hostname(""), Key: k, VIP: netip.MustParseAddr(fmt.Sprintf("10.96.0.%d", 10+i)),
			Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
		r.UpdateService(c1, k.Hostname(""), svc, []mesh.Endpoint{ep(fmt.Sprintf("10.1.0.%d", 1+i), "c1", "n1", false, "a")})
	}
	return r
}

const webToCartVS = `
metadata: {name: web, namespace: demo}
spec:
  hosts: [web]
  http:
  - route:
    - destination: {host: cart.shop.svc.cluster.local}
`

func setSidecars(t testing.TB, r *Registry, docs ...string) {
	t.Helper()
	tc := newTrafficConfig("cluster.local", []*networkingv1.VirtualService{mustVS(t, webToCartVS)}, nil)
	for i, d := range docs {
		sc := mustSidecar(t, d)
		sc.CreationTimestamp = metav1.Unix(int64(i), 0)
		sc.ResourceVersion = fmt.Sprint(i + 1)
		tc.Sidecars = append(tc.Sidecars, sc)
	}
	r.SetTrafficConfig(tc)
}

// listenerNames returns a proxyless view's api_listener names (one per service port).
func listenerNames(t testing.TB, b *Builder, v *View, key ViewKey) []string {
	t.Helper()
	res, err := b.Build(v, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range res[resource.ListenerType] {
		out = append(out, strings.TrimSuffix(cache.GetResourceName(l), ".svc.cluster.local:8080"))
	}
	// Every cluster a route names must be in the view.
	have := map[string]bool{}
	for _, c := range res[resource.ClusterType] {
		have[cache.GetResourceName(c)] = true
	}
	for _, svc := range v.Services {
		if slices.Contains(out, strings.TrimSuffix(string(svc.Hostname), ".svc.cluster.local")) {
			for _, d := range routeDestinationsOf(b.trafficPlanFor(v), svc.Hostname) {
				if !have[mesh.OutboundName{Port: 8080, Host: d}.ClusterName()] {
					t.Errorf("view %s: %s routes to %s, whose cluster is not in the view", key, svc.Hostname, d)
				}
			}
		}
	}
	return out
}

func routeDestinationsOf(p *trafficPlan, h mesh.Hostname) []mesh.Hostname {
	var out []mesh.Hostname
	if hp := p.hosts[h]; hp != nil {
		for _, rs := range hp.routes {
			for _, r := range rs {
				out = append(out, routeDestinations(r)...)
			}
		}
	}
	return out
}

// TestSidecarScopesView checks which services each namespace's proxies receive: a
// namespace Sidecar, the root namespace's default for namespaces without one (with "."
// meaning each proxy's own namespace), the destinations of admitted routes, gateways
// never scoped, and the full view back once the Sidecars are gone.
func TestSidecarScopesView(t *testing.T) {
	r := scopeRegistry(t)
	b := NewBuilder()
	all := []string{"cart.shop", "echo.demo", "telemetry.istio-system", "web.demo"}
	grpc := func(ns string) ViewKey { return ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: ns} }

	setSidecars(t, r)
	if got := listenerNames(t, b, r.View(), grpc("demo")); !slices.Equal(got, all) {
		t.Fatalf("no Sidecar: %v", got)
	}

	setSidecars(t, r, `
metadata: {name: default, namespace: demo}
spec:
  egress:
  - hosts: ["./echo.demo.svc.cluster.local", "istio-system/*"]
`)
	v := r.View()
	for _, c := range []struct {
		key  ViewKey
		want []string
	}{
		{grpc("demo"), []string{"echo.demo", "telemetry.istio-system"}},
		{grpc("shop"), all},
		{grpc(""), all},
	} {
		if got := listenerNames(t, b, v, c.key); !slices.Equal(got, c.want) {
			t.Errorf("%s: got %v, want %v", c.key, got, c.want)
		}
	}
	res, err := b.Build(v, ViewKey{Kind: ProxySidecar, Network: "n1", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res[resource.ClusterType]); n != 2 {
		t.Errorf("Envoy sidecar in demo: %d clusters, want 2", n)
	}
	gwRes, err := b.Build(v, ViewKey{Kind: ProxyGateway, Network: "n1", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(gwRes[resource.ClusterType]); n != 8 { // outbound| and sni-dnat per service
		t.Errorf("gateway: %d clusters, want 8 (never scoped)", n)
	}

	// The mesh default: every namespace without its own sees its own services and the
	// control plane's; web's route to cart brings cart in.
	setSidecars(t, r, `
metadata: {name: default, namespace: istio-system}
spec:
  egress:
  - hosts: ["./*", "istio-system/*"]
`, `
metadata: {name: default, namespace: shop}
spec:
  egress:
  - hosts: ["~/*"]
`)
	v = r.View()
	if got, want := listenerNames(t, b, v, grpc("demo")), all; !slices.Equal(got, want) {
		t.Errorf("demo under the default: got %v, want %v (cart through web's route)", got, want)
	}
	if got := listenerNames(t, b, v, grpc("shop")); len(got) != 0 {
		t.Errorf("shop with ~/*: got %v, want nothing", got)
	}
	if got, want := listenerNames(t, b, v, grpc("other")), []string{"telemetry.istio-system"}; !slices.Equal(got, want) {
		t.Errorf("other under the default: got %v, want %v", got, want)
	}

	setSidecars(t, r)
	if got := listenerNames(t, b, r.View(), grpc("shop")); !slices.Equal(got, all) {
		t.Fatalf("Sidecars deleted: %v", got)
	}
}

// TestSidecarMemoShared checks that views differing only by namespace reuse one
// service's resources (the same pointers), whichever view was built first.
func TestSidecarMemoShared(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, `
metadata: {name: default, namespace: demo}
spec:
  egress:
  - hosts: ["istio-system/*"]
`)
	v := r.View()
	b := NewBuilder()
	scoped, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	full, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := b.Build(v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo"})
	if err != nil {
		t.Fatal(err)
	}
	if len(scoped[resource.ClusterType]) != 1 || len(full[resource.ClusterType]) != 4 {
		t.Fatalf("clusters: scoped %d, full %d", len(scoped[resource.ClusterType]), len(full[resource.ClusterType]))
	}
	if scoped[resource.ClusterType][0] != again[resource.ClusterType][0] || !slices.Contains(full[resource.ClusterType], scoped[resource.ClusterType][0]) {
		t.Error("the telemetry cluster was rebuilt instead of shared between the views")
	}
}

// TestSidecarBadConfig checks each refusal and warning, and that a refused Sidecar
// scopes nothing while the others still apply.
func TestSidecarBadConfig(t *testing.T) {
	for _, c := range []struct {
		name, doc, reason, msg string
	}{
		{"selector without labels", `{metadata: {name: s, namespace: demo}, spec: {workloadSelector: {}, egress: [{hosts: ["./*"]}]}}`, ReasonInvalid, "workloadSelector.labels is required"},
		{"selector bad key", `{metadata: {name: s, namespace: demo}, spec: {workloadSelector: {labels: {"a b": x}}, egress: [{hosts: ["./*"]}]}}`, ReasonInvalid, `workloadSelector.labels key "a b"`},
		{"selector bad value", `{metadata: {name: s, namespace: demo}, spec: {workloadSelector: {labels: {app: "-x"}}, egress: [{hosts: ["./*"]}]}}`, ReasonInvalid, "workloadSelector.labels[app]"},
		{"port", `{metadata: {name: s, namespace: demo}, spec: {egress: [{port: {number: 80, protocol: HTTP, name: http}, hosts: ["./*"]}]}}`, ReasonUnsupported, "egress[0].port"},
		{"bind", `{metadata: {name: s, namespace: demo}, spec: {egress: [{bind: 127.0.0.1, hosts: ["./*"]}]}}`, ReasonUnsupported, "egress[0].bind"},
		{"capture", `{metadata: {name: s, namespace: demo}, spec: {egress: [{captureMode: NONE, hosts: ["./*"]}]}}`, ReasonUnsupported, "captureMode"},
		{"no slash", `{metadata: {name: s, namespace: demo}, spec: {egress: [{hosts: ["echo.demo.svc.cluster.local"]}]}}`, ReasonInvalid, `egress[0].hosts[0] "echo.demo.svc.cluster.local": want namespace/dnsName`},
		{"bad ns", `{metadata: {name: s, namespace: demo}, spec: {egress: [{hosts: ["Demo_/*"]}]}}`, ReasonInvalid, "namespace"},
		{"mid wildcard", `{metadata: {name: s, namespace: demo}, spec: {egress: [{hosts: ["*/a.*.com"]}]}}`, ReasonInvalid, "first label"},
		{"no hosts", `{metadata: {name: s, namespace: demo}, spec: {egress: [{}]}}`, ReasonInvalid, "egress[0].hosts is required"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := scopeRegistry(t)
			setSidecars(t, r, c.doc, `{metadata: {name: ok, namespace: shop}, spec: {egress: [{hosts: ["./*"]}]}}`)
			v := r.View()
			b := NewBuilder()
			st := b.trafficPlanFor(v).status
			got := st[len(st)-2]
			if got.Kind != KindSidecar || got.Applied || got.Reason != c.reason || !strings.Contains(got.Message, c.msg) {
				t.Fatalf("status %+v, want refused %s containing %q", got, c.reason, c.msg)
			}
			if ok := st[len(st)-1]; !ok.Applied || !slices.Equal(ok.Hosts, []string{"./*"}) {
				t.Fatalf("the valid Sidecar: %+v", ok)
			}
			if n := len(listenerNames(t, b, v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo"})); n != 4 {
				t.Errorf("demo sees %d services, want all 4 (its Sidecar was refused)", n)
			}
			if got := listenerNames(t, b, v, ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "shop"}); !slices.Equal(got, []string{"cart.shop"}) {
				t.Errorf("shop: %v", got)
			}
		})
	}

	r := scopeRegistry(t)
	setSidecars(t, r,
		`{metadata: {name: first, namespace: demo}, spec: {egress: [{hosts: ["./*"]}], ingress: [{port: {number: 9080, protocol: HTTP, name: http}}], outboundTrafficPolicy: {mode: REGISTRY_ONLY}}}`,
		`{metadata: {name: second, namespace: demo}, spec: {egress: [{hosts: ["*/*"]}]}}`)
	st := NewBuilder().trafficPlanFor(r.View()).status
	first, second := st[len(st)-2], st[len(st)-1]
	if !first.Applied || len(first.Warnings) != 2 {
		t.Errorf("first: %+v, want applied with ingress and outboundTrafficPolicy warnings", first)
	}
	if second.Applied || second.Reason != ReasonConflict || !strings.Contains(second.Message, "first") {
		t.Errorf("second: %+v, want a conflict naming first", second)
	}
}

// TestEgressHostMatch pins the host forms.
func TestEgressHostMatch(t *testing.T) {
	for _, c := range []struct {
		host, svc, svcNS, proxyNS string
		want                      bool
	}{
		{"*/*", "a.x.svc.cluster.local", "x", "y", true},
		{"./*", "a.x.svc.cluster.local", "x", "x", true},
		{"./*", "a.x.svc.cluster.local", "x", "y", false},
		{"./*", "a.x.svc.cluster.local", "x", "", false},
		{"~/*", "a.x.svc.cluster.local", "x", "x", false},
		{"x/*", "a.x.svc.cluster.local", "x", "y", true},
		{"x/a.x.svc.cluster.local", "a.x.svc.cluster.local", "x", "y", true},
		{"x/b.x.svc.cluster.local", "a.x.svc.cluster.local", "x", "y", false},
		{"*/*.example.com", "api.example.com", "ext", "y", true},
		{"*/*.example.com", "example.com", "ext", "y", false},
		{"y/*.example.com", "api.example.com", "ext", "y", false},
	} {
		h, err := parseEgressHost(c.host)
		if err != nil {
			t.Fatalf("%s: %v", c.host, err)
		}
		if got := h.matches(mesh.Hostname(c.svc), c.svcNS, c.proxyNS); got != c.want {
			t.Errorf("%s matches %s (ns %s) for a proxy in %q: %v, want %v", c.host, c.svc, c.svcNS, c.proxyNS, got, c.want)
		}
	}
}

// TestViewKeyNamespace checks that the namespace round-trips through the key's string
// form and that gateways never carry one.
func TestViewKeyNamespace(t *testing.T) {
	k := ViewKey{Kind: ProxyGRPC, Network: "n1", Locality: mesh.Locality{Region: "r", Zone: "z"}, Namespace: "demo"}
	got, err := ParseViewKey(k.String())
	if err != nil || got != k {
		t.Fatalf("ParseViewKey(%q) = %+v, %v", k.String(), got, err)
	}
	if k := (Proxy{Kind: ProxyGateway, ConfigNamespace: "istio-system"}).Key(); k.Namespace != "" {
		t.Errorf("gateway key %s has a namespace", k)
	}
}

// TestSidecarScopedGolden pins the proxyless view of a proxy in demo scoped to its own
// namespace and istio-system (testdata/sidecarscope-grpc.golden; rewrite with -update).
func TestSidecarScopedGolden(t *testing.T) {
	r := scopeRegistry(t)
	setSidecars(t, r, `
metadata: {name: default, namespace: demo}
spec:
  egress:
  - hosts: ["./echo.demo.svc.cluster.local", "istio-system/*"]
`)
	key := ViewKey{Kind: ProxyGRPC, Network: "n1", Namespace: "demo"}
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
	path := filepath.Join("testdata", "sidecarscope-grpc.golden")
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
		t.Errorf("scoped view differs from %s (-want +got):\n%s", path, d)
	}
}

// TestProxyNamespace checks where a proxy's namespace comes from: metadata NAMESPACE,
// else the node ID's pod part, else its domain; a malformed NAMESPACE is refused and an
// ID outside Istio's convention names none.
func TestProxyNamespace(t *testing.T) {
	for _, c := range []struct {
		id, meta, want string
		wantErr        bool
	}{
		{id: "sidecar~10.0.0.1~p.demo~demo.svc.cluster.local", want: "demo"},
		{id: "sidecar~10.0.0.1~p~shop.svc.cluster.local", want: "shop"},
		{id: "sidecar~10.0.0.1~p.demo~demo.svc.cluster.local", meta: "demo", want: "demo"},
		{id: "free-form-id", meta: "shop", want: "shop"},
		{id: "free-form-id", want: ""},
		{id: "sidecar~10.0.0.1~p.Not_A_Label~x", want: ""},
		{id: "free-form-id", meta: "Bad_NS", wantErr: true},
	} {
		fields := map[string]any{MetaGenerator: "grpc"}
		if c.meta != "" {
			fields[MetaNamespace] = c.meta
		}
		meta, err := structpb.NewStruct(fields)
		if err != nil {
			t.Fatal(err)
		}
		p, err := ProxyFromNode(&core.Node{Id: c.id, Metadata: meta})
		if (err != nil) != c.wantErr || p.ConfigNamespace != c.want || p.Key().Namespace != c.want {
			t.Errorf("%s (NAMESPACE %q): %q, %v; want %q (error %v)", c.id, c.meta, p.ConfigNamespace, err, c.want, c.wantErr)
		}
	}
}

// FuzzSidecarPlan feeds arbitrary Sidecar documents to the planner and the builder: they
// never panic, every Sidecar is applied or refused with a reason, and the scoped views
// pass Envoy's validation.
func FuzzSidecarPlan(f *testing.F) {
	f.Add(`{metadata: {name: s, namespace: demo}, spec: {egress: [{hosts: ["./*", "istio-system/*.cluster.local"]}]}}`)
	f.Add(`{metadata: {name: s, namespace: istio-system}, spec: {egress: [{hosts: ["~/*"]}, {port: {number: 1}, hosts: ["*/x"]}]}}`)
	f.Add(`{metadata: {name: s, namespace: shop}, spec: {workloadSelector: {labels: {a: b}}, ingress: [{}]}}`)
	f.Add(`{metadata: {name: s, namespace: demo}, spec: {workloadSelector: {labels: {app: web}}, egress: [{hosts: ["shop/*"]}]}}`)
	f.Fuzz(func(t *testing.T, doc string) {
		sc := &networkingv1.Sidecar{}
		if yaml.Unmarshal([]byte(doc), sc) != nil {
			return
		}
		tc := newTrafficConfig("cluster.local", []*networkingv1.VirtualService{mustVS(t, webToCartVS)}, nil)
		tc.Sidecars = []*networkingv1.Sidecar{sc}
		reg := scopeRegistry(t)
		reg.SetTrafficConfig(tc)
		v := reg.View()
		b := NewBuilder()
		for _, st := range b.trafficPlanFor(v).status {
			if st.Kind == KindSidecar && !st.Applied && (st.Reason == "" || st.Message == "") {
				t.Fatalf("refused without a reason: %+v", st)
			}
		}
		for _, key := range []ViewKey{{Namespace: sc.Namespace}, {Namespace: "demo"}, {Namespace: "istio-system"}, {}, {Namespace: sc.Namespace, Workload: sc.Name}} {
			key.Kind, key.Network = ProxyGRPC, "n1"
			res, err := b.Build(v, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
		}
	})
}
