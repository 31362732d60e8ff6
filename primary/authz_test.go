package primary

import (
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Policies as a user writes them (after Istio's authorization tasks, written anew): the
// frontend may call echo's Echo methods, anyone in namespace "ops" is denied when it sends
// "x-debug: on", and the plain pod takes mTLS only (STRICT on its port 8080).
const (
	authzAllowFrontend = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/demo/sa/frontend, "*/sa/admin"]}
    to:
    - operation: {paths: ["/grpc.testing.TestService/*"], methods: [POST]}
`
	authzDenyOps = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ops-debug, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [ops], notPrincipals: [cluster.local/ns/ops/sa/oncall]}
    when:
    - {key: "request.headers[x-debug]", values: ["on"]}
`
	peerStrictPlain = `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: plain-strict, namespace: demo}
spec:
  selector: {matchLabels: {app: plain}}
  portLevelMtls: {8080: {mode: STRICT}}
`
)

// securityRegistry is a mesh with three pods in namespace demo on network n1: echo
// (mTLS-ready, xDS-enabled), plain (xDS-enabled, not mTLS-ready) and legacy (not
// xDS-enabled), plus an xDS-enabled echo pod on network n2.
func securityRegistry() *Registry {
	r := NewRegistry()
	key := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	svc := &Service{Hostname: key.Hostname(""), Key: key, VIP: netip.MustParseAddr("10.96.0.10"), Ports: []ServicePort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}}}
	pod := func(addr string, network mesh.NetworkID, mtls bool, labels map[string]string) mesh.Endpoint {
		e := ep(addr, "c1", network, mtls, "a")
		e.Labels = labels
		e.Ports = []mesh.Port{{Name: "grpc", Number: 8080, Protocol: mesh.ProtocolGRPC}}
		return e
	}
	r.UpdateService(ShardKey{SourceKubernetes, "c1"}, key.Hostname(""), svc, []mesh.Endpoint{
		pod("10.1.0.1", "n1", true, map[string]string{"app": "echo", LabelXDSServer: "true"}),
		pod("10.1.0.2", "n1", false, map[string]string{"app": "plain", LabelXDSServer: "true"}),
		pod("10.1.0.3", "n1", true, map[string]string{"app": "legacy"}),
		pod("10.2.0.1", "n2", true, map[string]string{"app": "echo", LabelXDSServer: "true"}),
	})
	return r
}

// decode reads Istio security objects from YAML, created one second apart in order.
func decode(t testing.TB, docs ...string) *SecurityConfig {
	t.Helper()
	sc := &SecurityConfig{RootNamespace: "istio-system"}
	for i, d := range docs {
		meta := struct {
			Kind string `json:"kind"`
		}{}
		if err := yaml.Unmarshal([]byte(d), &meta); err != nil {
			t.Fatal(err)
		}
		created := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, i, 0, time.UTC))
		switch meta.Kind {
		case KindAuthorizationPolicy:
			ap := &securityv1.AuthorizationPolicy{}
			if err := yaml.UnmarshalStrict([]byte(d), ap); err != nil {
				t.Fatal(err)
			}
			ap.CreationTimestamp = created
			sc.AuthorizationPolicies = append(sc.AuthorizationPolicies, ap)
		case KindPeerAuthentication:
			pa := &securityv1.PeerAuthentication{}
			if err := yaml.UnmarshalStrict([]byte(d), pa); err != nil {
				t.Fatal(err)
			}
			pa.CreationTimestamp = created
			sc.PeerAuthentications = append(sc.PeerAuthentications, pa)
		default:
			t.Fatalf("document %d: kind %q", i, meta.Kind)
		}
	}
	return newSecurityConfig(sc.RootNamespace, sc.AuthorizationPolicies, sc.PeerAuthentications)
}

// inbound returns the inbound listeners of v's view key by name.
func inbound(t *testing.T, b *Builder, v *View, key ViewKey) map[string]*listener.Listener {
	t.Helper()
	res, err := b.Build(v, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	out := map[string]*listener.Listener{}
	for _, r := range res[resource.ListenerType] {
		if l := r.(*listener.Listener); strings.HasPrefix(l.Name, "grpc/server?") {
			out[l.Name] = l
		}
	}
	return out
}

// TestAuthzGolden compares the inbound listeners of network n1's proxyless view with
// testdata/authz-grpc.golden: echo gets mTLS (it is mTLS-ready), the deny filter (the
// mesh-wide DENY policy) and the allow filter; plain gets mTLS from its STRICT port and only
// the deny filter (no ALLOW policy selects it); legacy and the n2 pod get none.
func TestAuthzGolden(t *testing.T) {
	r := securityRegistry()
	r.SetSecurityConfig(decode(t, authzAllowFrontend, authzDenyOps, peerStrictPlain))
	v := r.View()
	key := ViewKey{Kind: ProxyGRPC, Network: "n1"}
	res, err := BuildResources(v, key)
	if err != nil {
		t.Fatal(err)
	}
	var only Resources = map[resource.Type][]types.Resource{}
	for _, l := range res[resource.ListenerType] {
		if strings.HasPrefix(l.(*listener.Listener).Name, "grpc/server?") {
			only[resource.ListenerType] = append(only[resource.ListenerType], l)
		}
	}
	if err := only.Validate(); err != nil {
		t.Fatal(err)
	}
	got, err := renderGolden(key, only)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join("testdata", "authz-grpc.golden")
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
		t.Errorf("inbound listeners differ from %s (-want +got); if intended, rerun with -update:\n%s", path, d)
	}
}

// TestSidecarInboundGolden compares the Envoy inbound translation for network n1 with
// testdata/authz-sidecar.golden: legacy (mTLS-ready, not an xDS server) gets an mTLS chain
// and, PERMISSIVE by default, a plaintext chain, both with the mesh-wide DENY filter;
// with STRICT for its namespace only the mTLS chain remains.
func TestSidecarInboundGolden(t *testing.T) {
	r := securityRegistry()
	r.SetSecurityConfig(decode(t, authzAllowFrontend, authzDenyOps, peerStrictPlain))
	key := ViewKey{Kind: ProxySidecar, Network: "n1"}
	res, err := BuildSidecarInbound(r.View(), key)
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
	path := filepath.Join("testdata", "authz-sidecar.golden")
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	} else if want, err := os.ReadFile(path); err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	} else if d := cmp.Diff(string(want), string(got)); d != "" {
		t.Errorf("sidecar inbound differs from %s (-want +got); if intended, rerun with -update:\n%s", path, d)
	}
	strict := `{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: strict, namespace: demo}, spec: {mtls: {mode: STRICT}}}`
	r.SetSecurityConfig(decode(t, strict))
	res, err = BuildSidecarInbound(r.View(), key)
	if err != nil {
		t.Fatal(err)
	}
	var tps []string
	for _, fc := range res[resource.ListenerType][0].(*listener.Listener).FilterChains {
		tps = append(tps, fc.FilterChainMatch.TransportProtocol)
	}
	if !slices.Equal(tps, []string{"tls"}) {
		t.Fatalf("STRICT chains %v; want only tls", tps)
	}
}

// TestInboundListeners checks which pods get a listener, with which security, and that
// the listener is withheld while the security configuration is unknown.
func TestInboundListeners(t *testing.T) {
	r := securityRegistry()
	b := NewBuilder()
	key := ViewKey{Kind: ProxyGRPC, Network: "n1"}
	if got := inbound(t, b, r.View(), key); len(got) != 0 {
		t.Fatalf("inbound listeners before the security configuration is known: %v", slices.Sorted(maps.Keys(got)))
	}
	r.SetSecurityConfig(decode(t, authzAllowFrontend, authzDenyOps, peerStrictPlain))
	v := r.View()
	got := inbound(t, b, v, key)
	echo := InboundListenerName(netip.MustParseAddrPort("10.1.0.1:8080"))
	plain := InboundListenerName(netip.MustParseAddrPort("10.1.0.2:8080"))
	if names := slices.Sorted(maps.Keys(got)); !slices.Equal(names, []string{echo, plain}) {
		t.Fatalf("inbound listeners %v; want echo's and plain's (legacy is not xDS-enabled, the n2 pod is on another network)", names)
	}
	if echo != "grpc/server?xds.resource.listening_address=10.1.0.1:8080" {
		t.Fatalf("listener name %q", echo)
	}
	for name, wantFilters := range map[string][]string{
		echo:  {rbacDenyFilter, rbacAllowFilter, "envoy.filters.http.router"},
		plain: {rbacDenyFilter, "envoy.filters.http.router"},
	} {
		fc := got[name].FilterChains[0]
		if fc.TransportSocket == nil {
			t.Errorf("%s: no mTLS (echo is mTLS-ready, plain is STRICT on 8080)", name)
		}
		m := hcmOf(t, fc)
		var names []string
		for _, f := range m.HttpFilters {
			names = append(names, f.Name)
		}
		if !slices.Equal(names, wantFilters) {
			t.Errorf("%s: filters %v, want %v", name, names, wantFilters)
		}
	}
	// Same inputs: the very same listener values (the cache does not marshal them again).
	again := inbound(t, b, v, key)
	if again[echo] != got[echo] {
		t.Fatal("an unchanged view rebuilt its inbound listeners")
	}
	// Without the STRICT PeerAuthentication, plain (not mTLS-ready) serves plaintext.
	r.SetSecurityConfig(decode(t, authzAllowFrontend))
	after := inbound(t, b, r.View(), key)
	if after[plain].FilterChains[0].TransportSocket != nil {
		t.Fatal("plain has mTLS without a STRICT PeerAuthentication")
	}
	if after[echo] == got[echo] {
		t.Fatal("a changed security configuration kept the old listener")
	}
}

// TestPeerAuthenticationPrecedence: the most specific level that sets a mode wins (port,
// workload, namespace, mesh), UNSET defers, and the default is PERMISSIVE.
func TestPeerAuthenticationPrecedence(t *testing.T) {
	mesh := `{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: default, namespace: istio-system}, spec: {mtls: {mode: STRICT}}}`
	ns := `{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: ns, namespace: demo}, spec: {mtls: {mode: PERMISSIVE}}}`
	wl := `{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: wl, namespace: demo}, spec: {selector: {matchLabels: {app: a}}, mtls: {mode: UNSET}, portLevelMtls: {9000: {mode: STRICT}}}}`
	for _, tc := range []struct {
		name   string
		docs   []string
		ns     string
		labels map[string]string
		port   uint32
		strict bool
	}{
		{"default permissive", nil, "demo", nil, 8080, false},
		{"mesh strict", []string{mesh}, "other", nil, 8080, true},
		{"namespace overrides mesh", []string{mesh, ns}, "demo", nil, 8080, false},
		{"workload unset defers to namespace", []string{mesh, ns, wl}, "demo", map[string]string{"app": "a"}, 8080, false},
		{"port level wins", []string{mesh, ns, wl}, "demo", map[string]string{"app": "a"}, 9000, true},
		{"selector must match", []string{ns, wl}, "demo", map[string]string{"app": "b"}, 9000, false},
		{"a root-namespace selector stays in the root namespace", []string{strings.Replace(wl, "namespace: demo", "namespace: istio-system", 1)}, "demo", map[string]string{"app": "a"}, 9000, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := &View{Security: decode(t, tc.docs...)}
			if got := planSecurity(v).strict(tc.ns, tc.labels, tc.port); got != tc.strict {
				t.Fatalf("strict = %v, want %v", got, tc.strict)
			}
		})
	}
}

// TestSecurityRefusals: every refused object names its field and reason, refuses alone,
// and fails closed where it is an AuthorizationPolicy.
func TestSecurityRefusals(t *testing.T) {
	ap := func(spec string) string {
		return "{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: bad, namespace: demo}, spec: " + spec + "}"
	}
	pa := func(spec string) string {
		return "{apiVersion: security.istio.io/v1, kind: PeerAuthentication, metadata: {name: bad, namespace: demo}, spec: " + spec + "}"
	}
	for _, tc := range []struct {
		name, doc, reason, msg string
		denyAll                bool // a refused DENY policy denies everything
	}{
		{"audit action", ap("{action: AUDIT, rules: [{}]}"), ReasonUnsupported, "action AUDIT", false},
		{"custom provider", ap("{action: CUSTOM, provider: {name: ext}, rules: [{}]}"), ReasonUnsupported, "action CUSTOM", false},
		{"ip blocks", ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}"), ReasonUnsupported, "rules[0].from[0].source.ipBlocks", false},
		{"request principals", ap("{action: DENY, rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"), ReasonUnsupported, "rules[0].from[0].source.requestPrincipals", true},
		{"ports", ap("{rules: [{to: [{operation: {ports: ['8080']}}]}]}"), ReasonUnsupported, "rules[0].to[0].operation: hosts and ports", false},
		{"bad principal wildcard", ap("{rules: [{from: [{source: {principals: ['a*b']}}]}]}"), ReasonInvalid, `rules[0].from[0].source.principals[0] "a*b"`, false},
		{"empty principal", ap("{rules: [{from: [{source: {principals: ['']}}]}]}"), ReasonInvalid, "principals[0]", false},
		{"bad namespace", ap("{rules: [{from: [{source: {namespaces: ['a/b']}}]}]}"), ReasonInvalid, "namespaces[0]", false},
		{"relative path", ap("{rules: [{to: [{operation: {paths: [Echo]}}]}]}"), ReasonInvalid, `paths[0] "Echo"`, false},
		{"grpc header", ap("{action: DENY, rules: [{when: [{key: 'request.headers[grpc-timeout]', values: ['1s']}]}]}"), ReasonInvalid, `rules[0].when[0]: header "grpc-timeout"`, true},
		{"unknown key", ap("{rules: [{when: [{key: source.ip, values: [10.0.0.1]}]}]}"), ReasonUnsupported, `key "source.ip"`, false},
		{"no values", ap("{rules: [{when: [{key: 'request.headers[x]'}]}]}"), ReasonInvalid, "values or notValues", false},
		{"target ref", ap("{targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}, rules: [{}]}"), ReasonUnsupported, "targetRef", false},
		{"disable", pa("{mtls: {mode: DISABLE}}"), ReasonUnsupported, "mtls.mode DISABLE", false},
		{"port level without selector", pa("{portLevelMtls: {8080: {mode: STRICT}}}"), ReasonInvalid, "portLevelMtls needs a selector", false},
		{"port level disable", pa("{selector: {matchLabels: {app: echo}}, portLevelMtls: {8080: {mode: DISABLE}}}"), ReasonUnsupported, "portLevelMtls[8080].mode DISABLE", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			good := `{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {name: good, namespace: demo}, spec: {selector: {matchLabels: {app: echo}}, rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/frontend]}}]}]}}`
			sp := planSecurity(&View{Security: decode(t, good, tc.doc)})
			var bad, ok *ConfigStatus
			for i := range sp.status {
				if sp.status[i].Name == "bad" {
					bad = &sp.status[i]
				} else {
					ok = &sp.status[i]
				}
			}
			if bad == nil || bad.Applied || bad.Reason != tc.reason || !strings.Contains(bad.Message, tc.msg) {
				t.Fatalf("status %+v; want refused with %s and a message containing %q", bad, tc.reason, tc.msg)
			}
			if ok == nil || !ok.Applied {
				t.Fatalf("the good policy was not applied beside the bad one: %+v", sp.status)
			}
			deny, allow := rbacFor(sp.authz, "demo", map[string]string{"app": "echo"})
			if got := policyNames(allow); !slices.Equal(got, []string{"demo.good.rule[0]"}) {
				t.Fatalf("allow policies %v: the bad object must add nothing", got)
			}
			if tc.denyAll != (deny != nil) {
				t.Fatalf("deny %v; a refused DENY policy (only) must deny everything", policyNames(deny))
			}
		})
	}
	t.Run("namespace-wide conflict", func(t *testing.T) {
		a := pa("{mtls: {mode: STRICT}}")
		b := strings.Replace(a, "name: bad", "name: later", 1)
		sp := planSecurity(&View{Security: decode(t, a, b)})
		if sp.status[1].Name != "later" || sp.status[1].Reason != ReasonConflict || !sp.status[0].Applied {
			t.Fatalf("statuses %+v; want the later one refused with conflict", sp.status)
		}
	})
	t.Run("refused ALLOW fails closed", func(t *testing.T) {
		sp := planSecurity(&View{Security: decode(t, ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]}"))})
		_, allow := rbacFor(sp.authz, "demo", nil)
		if allow == nil || len(allow.Policies) != 0 {
			t.Fatalf("allow %v; want an ALLOW configuration without policies (denies all)", allow)
		}
	})
}

// hcmOf unpacks a filter chain's connection manager.
func hcmOf(t *testing.T, fc *listener.FilterChain) *hcm.HttpConnectionManager {
	t.Helper()
	m := &hcm.HttpConnectionManager{}
	if err := fc.Filters[0].GetTypedConfig().UnmarshalTo(m); err != nil {
		t.Fatal(err)
	}
	return m
}

// FuzzSecurityPlan feeds arbitrary AuthorizationPolicy and PeerAuthentication documents
// (YAML or JSON) to the planner and builder over the security mesh. Whatever the input,
// planning never panics, every object is applied or refused with a reason and a message,
// and the proxyless view's resources and the sidecar inbound translation pass Envoy's
// proto validation (a bad object can never
// make the primary send a server a Listener it would NACK for a malformed proto).
func FuzzSecurityPlan(f *testing.F) {
	f.Add(authzAllowFrontend, peerStrictPlain)
	f.Add(authzDenyOps, "spec: {mtls: {mode: PERMISSIVE}}")
	f.Add("spec: {action: DENY, rules: [{when: [{key: 'request.headers[X-Test]', values: ['*', 'a*', '*b'], notValues: [c]}]}]}", "spec: {selector: {matchLabels: {app: echo}}, portLevelMtls: {8080: {mode: UNSET}, 0: {mode: STRICT}}}")
	f.Add("spec: {rules: [{from: [{source: {namespaces: ['*', 'a*', '*b'], notNamespaces: [c]}}], to: [{operation: {notPaths: ['*'], notMethods: [GET]}}]}, {}]}", "spec: {mtls: {mode: DISABLE}}")
	f.Add(`{"spec":{"action":"AUDIT","rules":[{"when":[{"key":"source.principal","values":["*"]}]}]}}`, `{"spec":{"mtls":{"mode":7}}}`)
	reg := securityRegistry()
	f.Fuzz(func(t *testing.T, apDoc, paDoc string) {
		ap := &securityv1.AuthorizationPolicy{}
		pa := &securityv1.PeerAuthentication{}
		if yaml.Unmarshal([]byte(apDoc), ap) != nil || yaml.Unmarshal([]byte(paDoc), pa) != nil {
			return // the API server would refuse it before the primary sees it
		}
		ap.Namespace, ap.Name, pa.Namespace, pa.Name = "demo", "ap", "demo", "pa"
		reg.SetSecurityConfig(newSecurityConfig("istio-system", []*securityv1.AuthorizationPolicy{ap}, []*securityv1.PeerAuthentication{pa}))
		v := reg.View()
		sp := planSecurity(v)
		if len(sp.status) != 2 {
			t.Fatalf("%d statuses for 2 objects", len(sp.status))
		}
		for _, st := range sp.status {
			if !st.Applied && (st.Reason == "" || st.Message == "") {
				t.Fatalf("refused without a reason: %+v", st)
			}
		}
		res, err := BuildResources(v, ViewKey{Kind: ProxyGRPC, Network: "n1"})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Validate(); err != nil {
			t.Fatalf("invalid resources from ap=%q pa=%q: %v", apDoc, paDoc, err)
		}
		side, err := BuildSidecarInbound(v, ViewKey{Kind: ProxySidecar, Network: "n1"})
		if err != nil {
			t.Fatal(err)
		}
		if err := side.Validate(); err != nil {
			t.Fatalf("invalid sidecar inbound from ap=%q pa=%q: %v", apDoc, paDoc, err)
		}
	})
}
