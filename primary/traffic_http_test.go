package primary

import (
	"strings"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// httpFeaturesVS uses every HTTP route feature that only Envoy acts on: a queryParams
// match, a mirror, a rewrite, header operations, and a redirect.
const httpFeaturesVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo, resourceVersion: "9"}
spec:
  hosts: [reviews]
  http:
  - name: query
    match:
    - queryParams: {debug: {exact: "1"}, trace: {}}
    route:
    - destination: {host: reviews, subset: v2}
  - name: moved
    match:
    - uri: {prefix: /old/}
    redirect: {uri: /new/, authority: reviews.example, redirectCode: 302}
  - name: main
    rewrite: {uri: /v1/, authority: reviews.internal}
    headers:
      request: {set: {x-a: "50%"}, add: {x-b: b}, remove: [x-c]}
      response: {remove: [x-d]}
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 12.5}
    route:
    - destination: {host: reviews, subset: v1}
`

// TestTrafficHTTPFeatures checks the Envoy translation of queryParams, mirror, redirect,
// rewrite and headers, and that proxyless clients get the safe form: no query route, no
// mirror, rewrite or header change, the redirect as is.
func TestTrafficHTTPFeatures(t *testing.T) {
	v := bookinfoView(t, []string{httpFeaturesVS}, []string{bookinfoDR})
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Fatalf("refused: %+v", st)
		}
	}
	sc, err := BuildResources(v, ViewKey{Kind: ProxySidecar, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Validate(); err != nil {
		t.Fatal(err)
	}
	gr, err := BuildResources(v, ViewKey{Kind: ProxyGRPC, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := gr.Validate(); err != nil {
		t.Fatal(err)
	}
	var rs []*route.Route
	for _, r := range sc[resource.RouteType] {
		for _, vh := range r.(*route.RouteConfiguration).GetVirtualHosts() {
			if vh.GetName() == "reviews.bookinfo.svc.cluster.local:9080" {
				rs = vh.GetRoutes()
			}
		}
	}
	if len(rs) != 3 {
		t.Fatalf("sidecar: %d routes, want 3", len(rs))
	}
	if q := rs[0].GetMatch().GetQueryParameters(); len(q) != 2 || q[0].GetName() != "debug" || q[0].GetStringMatch().GetExact() != "1" || !q[1].GetPresentMatch() {
		t.Errorf("query match: %v", q)
	}
	if rd := rs[1].GetRedirect(); rd.GetPathRedirect() != "/new/" || rd.GetHostRedirect() != "reviews.example" || rd.GetResponseCode().String() != "FOUND" {
		t.Errorf("redirect: %v", rd)
	}
	a := rs[2].GetRoute()
	if a.GetPrefixRewrite() != "/v1/" || a.GetHostRewriteLiteral() != "reviews.internal" {
		t.Errorf("rewrite: %v", a)
	}
	if m := a.GetRequestMirrorPolicies(); len(m) != 1 || m[0].GetCluster() != "outbound|9080|v3|reviews.bookinfo.svc.cluster.local" || m[0].GetRuntimeFraction().GetDefaultValue().GetNumerator() != 125000 {
		t.Errorf("mirror: %v", m)
	}
	if h := rs[2].GetRequestHeadersToAdd(); len(h) != 2 || h[0].GetHeader().GetValue() != "50%%" || rs[2].GetRequestHeadersToRemove()[0] != "x-c" {
		t.Errorf("headers: %v", h)
	}
	g := routesOf(t, gr)
	if len(g) != 2 || g[0].GetRedirect() == nil {
		t.Fatalf("proxyless: %d routes (want the redirect and main)", len(g))
	}
	if a := g[1].GetRoute(); len(a.GetRequestMirrorPolicies()) > 0 || a.GetPrefixRewrite() != "" || len(g[1].GetRequestHeadersToAdd()) > 0 {
		t.Errorf("proxyless route keeps Envoy-only fields: %v", g[1])
	}
}

// TestTrafficHTTPFeaturesRefused checks one refusal per bad new field.
func TestTrafficHTTPFeaturesRefused(t *testing.T) {
	vs := func(http string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n" + http
	}
	cases := []struct{ name, http, reason, msg string }{
		{"bad query regex", "  - match:\n    - queryParams: {a: {regex: \"(\"}}\n    route:\n    - destination: {host: reviews}\n", ReasonBadRegex, "queryParams[a].regex"},
		{"redirect with route", "  - redirect: {uri: /x}\n    route:\n    - destination: {host: reviews}\n", ReasonInvalid, "cannot be set together"},
		{"bad redirect code", "  - redirect: {uri: /x, redirectCode: 200}\n", ReasonInvalid, "redirectCode 200"},
		{"mirror of unknown host", "  - mirror: {host: nowhere}\n    route:\n    - destination: {host: reviews}\n", ReasonUnknownHost, "mirror.host"},
		{"mirror over 100 %", "  - mirror: {host: reviews}\n    mirrorPercentage: {value: 101}\n    route:\n    - destination: {host: reviews}\n", ReasonInvalid, "percentage 101"},
		{"pseudo-header set", "  - headers: {request: {set: {':path': /x}}}\n    route:\n    - destination: {host: reviews}\n", ReasonInvalid, "not a header name"},
		{"rewrite uri and regex", "  - rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}\n    route:\n    - destination: {host: reviews}\n", ReasonInvalid, "cannot both be set"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := bookinfoView(t, []string{vs(tc.http)}, []string{bookinfoDR})
			for _, st := range planTraffic(v).status {
				if st.Name == "bad" && (st.Applied || st.Reason != tc.reason || !strings.Contains(st.Message, tc.msg)) {
					t.Fatalf("status %+v; want %s containing %q", st, tc.reason, tc.msg)
				}
			}
		})
	}
}
