package scenarios

import (
	"strings"
	"testing"
)

func TestBuiltinsParseAndValidate(t *testing.T) {
	names := Builtins()
	for _, want := range []string{"single-cluster", "multi-primary", "multi-network", "multi-trust"} {
		found := false
		for _, n := range names {
			found = found || n == want
		}
		if !found {
			t.Errorf("built-in %q missing from %v", want, names)
		}
	}
	for _, n := range names {
		top, err := Builtin(n)
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		if top.Name != n {
			t.Errorf("file %s.yaml names scenario %q", n, top.Name)
		}
	}
	if _, err := Builtin("nope"); err == nil || !strings.Contains(err.Error(), "multi-network") {
		t.Errorf("unknown scenario: got %v, want an error listing the built-ins", err)
	}
}

const base = `
name: t
networks: [{name: n1, gateway: true}, {name: n2}]
clusters:
  - {name: c1, network: n1, podCIDR: 10.1.0.0/16, controlPlane: {role: primary}}
  - {name: c2, network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}}
workloads:
  - {service: echo, namespace: demo, replicas: {c1: 1, c2: 1}}
expect:
  - {from: c2, service: echo.demo, reach: [c1, c2]}
`

func TestValidate(t *testing.T) {
	top, err := Parse([]byte(base))
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatalf("valid topology refused: %v", err)
	}
	if top.Mesh.TrustDomain != "cluster.local" || top.Trust != TrustSingle || top.Workloads[0].Port != 8080 || top.Clusters[0].ServiceCIDR != "10.96.0.0/16" {
		t.Errorf("defaults not filled in: %+v", top)
	}

	cases := []struct {
		name, from, to string
		want           []string // each must appear in the error
	}{
		{"unknown network", "network: n2, podCIDR: 10.2", "network: n3, podCIDR: 10.2", []string{`clusters[1].network: unknown network "n3"`}},
		{"duplicate cluster", "name: c2, network", "name: c1, network", []string{`clusters[1].name: duplicate cluster "c1"`}},
		{"overlapping pod CIDRs on one network", "network: n2, podCIDR: 10.2.0.0/16", "network: n1, podCIDR: 10.1.128.0/17",
			[]string{`pod CIDRs 10.1.0.0/16 and 10.1.128.0/17 overlap on network "n1"`}},
		{"bad pod CIDR", "podCIDR: 10.2.0.0/16", "podCIDR: 10.2.0.0/30", []string{`clusters[1].podCIDR: "10.2.0.0/30" is not an IPv4 prefix`}},
		{"remote without its primary", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: remote}",
			[]string{"clusters[1].controlPlane: a remote cluster names its primary"}},
		{"remote of a remote", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: remote, primary: c2}",
			[]string{`clusters[1].controlPlane: primary "c2" is not a primary (or config) cluster`}},
		{"remote of an unknown primary", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: remote, primary: c9}",
			[]string{`clusters[1].controlPlane: primary "c9" is not a cluster of this topology`}},
		{"remote behind no gateway", "networks: [{name: n1, gateway: true}, {name: n2}]\nclusters:\n  - {name: c1, network: n1, podCIDR: 10.1.0.0/16, controlPlane: {role: primary}}\n  - {name: c2, network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}}",
			"networks: [{name: n1}, {name: n2, gateway: true}]\nclusters:\n  - {name: c1, network: n1, podCIDR: 10.1.0.0/16, controlPlane: {role: primary}}\n  - {name: c2, network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: remote, primary: c1}}",
			[]string{"through network n1's gateway, and that network has none"}},
		{"unknown role", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}", "network: n2, podCIDR: 10.2.0.0/16, controlPlane: {role: boss}",
			[]string{`clusters[1].controlPlane.role: "boss"`}},
		{"replica in unknown cluster", "replicas: {c1: 1, c2: 1}", "replicas: {c1: 1, c9: 1}", []string{`workloads[0].replicas: unknown cluster "c9"`}},
		{"expectation to a cluster without replicas", "replicas: {c1: 1, c2: 1}", "replicas: {c1: 1, c2: 0}", []string{`expect[0].reach: "c2" runs no replica of echo.demo`}},
		{"crossing into a network without gateway", "from: c2, service: echo.demo, reach: [c1, c2]", "from: c1, service: echo.demo, reach: [c1, c2]",
			[]string{`"c2" is on network "n2", which has no gateway, so "c1" cannot reach it`}},
		{"unknown service", "service: echo.demo, reach", "service: echo.other, reach", []string{`expect[0].service: unknown service "echo.other"`}},
		{"bad name", "name: t\n", "name: T_T\n", []string{`name: "T_T" is not a DNS label`}},
		{"trust model", "name: t\n", "name: t\ntrust: merged\n", []string{`trust: "merged" is not a supported trust model`}},
		{"federation needs multi", "name: t\n", "name: t\nfederation: [{from: c1, to: c1}]\n", []string{"federation: relationships need trust: multi", "share trust domain"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := strings.Replace(base, tc.from, tc.to, 1)
			if src == base {
				t.Fatalf("case does not change the topology: %q not found", tc.from)
			}
			top, err := Parse([]byte(src))
			if err != nil {
				t.Fatal(err)
			}
			err = top.Validate()
			if err == nil {
				t.Fatalf("accepted:\n%s", src)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	top, err := Parse([]byte(`{name: x, networks: [], clusters: [], workloads: [], expect: [{from: a, service: b.c, reach: [d]}]}`))
	if err != nil {
		t.Fatal(err)
	}
	err = top.Validate()
	ve, ok := err.(*ValidationError)
	if !ok {
		t.Fatalf("got %v, want a *ValidationError", err)
	}
	if len(ve.Problems) < 4 {
		t.Errorf("want every problem reported, got %d: %v", len(ve.Problems), ve.Problems)
	}
}

func TestParseIsStrict(t *testing.T) {
	for _, src := range []string{
		"name: t\nclustres: []\n", // misspelt key
		"name: [\n",               // not YAML
		"name: t\nclusters: {a: b}\n",
	} {
		if _, err := Parse([]byte(src)); err == nil {
			t.Errorf("parsed %q", src)
		}
	}
}

func TestVerdict(t *testing.T) {
	const srv, cli = "spiffe://cluster.local/ns/demo/sa/echo", "spiffe://cluster.local/ns/clients/sa/client"
	both := []Hop{{"c1", "direct"}, {"c2", "gateway n2"}}
	cases := []struct {
		name             string
		expected, got    []Hop
		servers, callers []string
		want             []string
	}{
		{"all as expected", both, both, []string{srv}, []string{cli}, nil},
		{"missing cluster", both, both[:1], []string{srv}, []string{cli}, []string{"c2 did not answer (expected gateway n2)"}},
		{"unexpected cluster", both[:1], both, []string{srv}, []string{cli}, []string{"c2 answered (gateway n2) but is not expected to"}},
		{"wrong path", both, []Hop{{"c1", "direct"}, {"c2", "direct"}}, []string{srv}, []string{cli}, []string{"c2 answered by direct, expected gateway n2"}},
		{"caller identity lost", both, both, []string{srv}, []string{""}, []string{`server saw caller identity ""`}},
		{"wrong server", both, both, []string{"spiffe://cluster.local/ns/demo/sa/other"}, []string{cli}, []string{"server presented identity"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := verdict(tc.expected, tc.got, tc.servers, tc.callers, []string{srv}, cli)
			if len(got) != len(tc.want) {
				t.Fatalf("reasons %q, want %q", got, tc.want)
			}
			for i := range got {
				if !strings.Contains(got[i], tc.want[i]) {
					t.Errorf("reason %q does not say %q", got[i], tc.want[i])
				}
			}
		})
	}
}

func FuzzParseValidate(f *testing.F) {
	for _, n := range Builtins() {
		src, _ := BuiltinSource(n)
		f.Add(src)
	}
	f.Add([]byte(base))
	f.Fuzz(func(t *testing.T, data []byte) {
		top, err := Parse(data)
		if err != nil {
			return
		}
		_ = top.Validate() // must never panic
	})
}
