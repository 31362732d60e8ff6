package proxy

import (
	"net/http"
	"strings"
	"testing"

	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// fuzzTable is a route table with every kind of domain and match.
func fuzzTable(t testing.TB) *RouteTable {
	rc := &route.RouteConfiguration{Name: "r", VirtualHosts: []*route.VirtualHost{
		{Name: "exact", Domains: []string{"echo.example.com", "echo.example.com:443"}, Routes: []*route.Route{
			{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Path{Path: "/exact"}}, Action: act("a")},
			{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: "/re/[0-9]+"}}}, Action: act("b")},
			{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/h"}, Headers: []*route.HeaderMatcher{
				{Name: "x-v", HeaderMatchSpecifier: &route.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "2"}}}},
			}}, Action: act("c")},
			{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}}, Action: act("d")},
		}},
		{Name: "suffix", Domains: []string{"*.example.com"}, Routes: []*route.Route{{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}}, Action: act("e")}}},
		{Name: "prefix", Domains: []string{"api.*"}, Routes: []*route.Route{{Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}}, Action: act("f")}}},
	}}
	tbl, err := TranslateRoutes(rc)
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

func act(c string) *route.Route_Route {
	return &route.Route_Route{Route: &route.RouteAction{ClusterSpecifier: &route.RouteAction_Cluster{Cluster: c}}}
}

func TestMatch(t *testing.T) {
	tbl := fuzzTable(t)
	for _, c := range []struct{ host, path, hdr, want string }{
		{"echo.example.com", "/exact", "", "a"},
		{"echo.example.com:443", "/exact?x=1", "", "a"},
		{"ECHO.example.com", "/re/12", "", "b"},
		{"echo.example.com", "/re/12x", "", "d"},
		{"echo.example.com", "/h", "2x", "c"},
		{"echo.example.com", "/h", "1", "d"},
		{"x.example.com", "/", "", "e"},
		{"api.other", "/", "", "f"},
		{"example.com", "/", "", ""},
	} {
		h := http.Header{}
		if c.hdr != "" {
			h.Set("X-V", c.hdr)
		}
		_, r := tbl.Match(c.host, c.path, h)
		got := ""
		if r != nil {
			got = r.Clusters[0].Name
		}
		if got != c.want {
			t.Errorf("%s%s (x-v %q): %q, want %q", c.host, c.path, c.hdr, got, c.want)
		}
	}
}

// FuzzRouteMatch: any host, path and header value is matched without panicking, and an
// exact domain always beats the wildcards.
func FuzzRouteMatch(f *testing.F) {
	f.Add("echo.example.com", "/re/1", "2")
	f.Add("a.example.com:80", "/?#", "")
	f.Add("api.*", "", "\x00")
	f.Add("[::1]:443", "//h", "22")
	tbl := fuzzTable(f)
	f.Fuzz(func(t *testing.T, host, path, v string) {
		h := http.Header{"X-V": {v}}
		vh, r := tbl.Match(host, path, h)
		if r != nil && vh == nil {
			t.Fatal("route without virtual host")
		}
		if strings.EqualFold(host, "echo.example.com") && (vh == nil || vh.Name != "exact") {
			t.Fatalf("exact host %q matched %v", host, vh)
		}
	})
}
