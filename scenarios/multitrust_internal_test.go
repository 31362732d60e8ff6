package scenarios

import (
	"strings"
	"testing"
)

// TestValidateMultiTrust: per-cluster trust domains and federation relationships, and
// every refusal with its place.
func TestValidateMultiTrust(t *testing.T) {
	top, err := MultiTrust()
	if err != nil {
		t.Fatal(err)
	}
	if top.TrustDomainOf("cluster-1") != "east.example" || top.TrustDomainOf("cluster-2") != "west.example" || len(top.Federation) != 2 {
		t.Fatalf("multi-trust: %s, %s, %v", top.TrustDomainOf("cluster-1"), top.TrustDomainOf("cluster-2"), top.Federation)
	}
	src, _ := BuiltinSource("multi-trust")
	cases := []struct {
		name, from, to, want string
	}{
		{"single trust with two domains", "trust: multi", "trust: single", `clusters[1].trustDomain: "west.example" differs from the mesh's "east.example"`},
		{"federation within one domain", "trustDomain: west.example", "trustDomain: east.example", "share trust domain"},
		{"federation with an unknown cluster", "{from: cluster-1, to: cluster-2}", "{from: cluster-1, to: cluster-9}", `federation[0].to: unknown cluster "cluster-9"`},
		{"federation listed twice", "{from: cluster-2, to: cluster-1}", "{from: cluster-1, to: cluster-2}", "listed twice"},
		{"bad caller identity", "callerIdentity: spiffe://east.example/ns/clients/sa/client", "callerIdentity: https://east", "expect[0].callerIdentity"},
		{"bad trust domain", "trustDomain: west.example", "trustDomain: West_Example", "clusters[1].trustDomain"},
		{"mesh-wide root rotation", "trust: multi\n", "trust: multi\nload: {rate: 5}\nfaults: [{kind: root-rotation, target: mesh, start: 1s, duration: 10s}]\n", "faults[0]: root-rotation rotates the mesh's one root"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := strings.Replace(string(src), c.from, c.to, 1)
			if s == string(src) {
				t.Fatalf("%q not in multi-trust.yaml", c.from)
			}
			top, err := Parse([]byte(s))
			if err != nil {
				t.Fatal(err)
			}
			err = top.Validate()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error saying %q", err, c.want)
			}
		})
	}
}
