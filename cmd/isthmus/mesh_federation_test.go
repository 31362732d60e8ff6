package main

import (
	"slices"
	"testing"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// TestFederationNamesAgree pins the contract between the importing and the exporting
// side: the name an importer gives a peer's service (federation.ImportHostname, whose
// cluster's SNI its clients send) is the name the exporter's primary aliases for its
// gateways, and the suffix the gateway's peer listener accepts.
func TestFederationNamesAgree(t *testing.T) {
	key := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	ge := gatewayExports("mesh-a", []federation.Export{
		{Key: key, Ports: []federation.CatalogPort{{Name: "grpc", Port: 8080}, {Name: "admin", Port: 9090}}, Consumers: []mesh.MeshID{"mesh-b"}},
		{Key: mesh.ServiceKey{Namespace: "demo", Name: "other"}, Ports: []federation.CatalogPort{{Name: "grpc", Port: 8080}}, Consumers: []mesh.MeshID{"mesh-c"}},
	}, map[mesh.MeshID]mesh.TrustDomain{"mesh-b": "b.example"})
	if got, want := ge.FederationHostname(key), federation.ImportHostname("mesh-a", key); got != want {
		t.Fatalf("exporter aliases %s, importer names %s", got, want)
	}
	if got := ge.Services[key]; !slices.Equal(got, []uint16{8080, 9090}) {
		t.Fatalf("exported ports %v", got)
	}
	// A service exported only to a mesh without a live peering is not routed for peers.
	if len(ge.Services) != 1 {
		t.Fatalf("gateway exports %v; want demo/echo only (mesh-c has no live peering)", ge.Services)
	}
	// Servers learn each live peer's trust domain and each service's live consumers.
	if !slices.Equal(ge.Consumers[key], []mesh.MeshID{"mesh-b"}) || len(ge.Peers) != 1 || ge.Peers["mesh-b"] != "b.example" {
		t.Fatalf("consumers %v, peers %v", ge.Consumers, ge.Peers)
	}
}
