package scenarios

import (
	"strings"
	"testing"
)

const meshesBase = `
name: t
meshes: [{id: ma, trustDomain: a.example}, {id: mb, trustDomain: b.example}]
peerings: [{from: mb, to: ma}]
exports: [{mesh: ma, service: echo.demo, to: [mb]}]
networks: [{name: na, gateway: true}, {name: nb, gateway: true}]
clusters:
  - {name: ca, mesh: ma, network: na, podCIDR: 10.1.0.0/16, controlPlane: {role: primary}}
  - {name: cb, mesh: mb, network: nb, podCIDR: 10.2.0.0/16, controlPlane: {role: primary}}
workloads:
  - {service: echo, namespace: demo, replicas: {ca: 1}}
expect:
  - {from: cb, service: echo.demo, mesh: ma, reach: [ca]}
`

func TestValidateMeshes(t *testing.T) {
	top, err := Parse([]byte(meshesBase))
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatalf("valid topology refused: %v", err)
	}
	if top.TrustDomainOf("cb") != "b.example" || top.FederationCluster("ma") != "ca" || !top.ExportedTo("ma", "echo.demo", "mb") {
		t.Errorf("mesh defaults wrong: %+v", top.Clusters)
	}
	if err := top.Validate(); err != nil { // Up validates a built-in again
		t.Fatalf("second Validate refused: %v", err)
	}
	cases := []struct{ name, from, to, want string }{
		{"mesh and meshes", "name: t\n", "name: t\nmesh: {id: m1}\n", "give either mesh"},
		{"duplicate trust domain", "trustDomain: b.example", "trustDomain: a.example", `"a.example" is also mesh "ma"'s`},
		{"unknown cluster mesh", "mesh: mb, network: nb", "mesh: mc, network: nb", `clusters[1].mesh: "mc" is not one of meshes`},
		{"shared network", "mesh: mb, network: nb", "mesh: mb, network: na", `network "na" is already mesh "ma"'s`},
		{"self peering", "{from: mb, to: ma}", "{from: ma, to: ma}", "a mesh does not peer with itself"},
		{"export to an unpeered mesh", "peerings: [{from: mb, to: ma}]", "peerings: []", `exports[0].to: mesh "mb" is not peered with "ma"`},
		{"export of an unknown service", "service: echo.demo, to", "service: nope.demo, to", `exports[0].service: unknown service "nope.demo"`},
		{"reach outside the called mesh", "mesh: ma, reach: [ca]", "mesh: mb, reach: [ca]", `"ca" is in mesh "ma", not "mb"`},
		{"trust multi", "name: t\n", "name: t\ntrust: multi\n", "with meshes each mesh has one root"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src := strings.Replace(meshesBase, tc.from, tc.to, 1)
			if src == meshesBase {
				t.Fatalf("case does not change the topology")
			}
			top, err := Parse([]byte(src))
			if err != nil {
				t.Fatal(err)
			}
			err = top.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error saying %q", err, tc.want)
			}
		})
	}
	// A single-mesh topology may not use the federation keys.
	top, _ = Parse([]byte(base + "peerings: [{from: a, to: b}]\n"))
	if err := top.Validate(); err == nil || !strings.Contains(err.Error(), "need meshes") {
		t.Errorf("peerings without meshes: %v", err)
	}
}
