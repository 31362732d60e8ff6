package federation

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func testCatalog() *Catalog {
	return &Catalog{Mesh: "mesh-a", TrustDomain: "a.example", Sequence: 3, Services: []ExportedService{{
		Namespace: "demo", Name: "echo",
		Ports:      []CatalogPort{{Name: "grpc", Port: 8080, Protocol: mesh.ProtocolGRPC}},
		Gateways:   []string{"10.1.0.1:15443"},
		Consumers:  []mesh.MeshID{"mesh-b"},
		Identities: []string{"spiffe://a.example/ns/demo/sa/echo"},
	}}}
}

func TestCatalogChecks(t *testing.T) {
	peer := PeerClaim{Mesh: "mesh-a", TrustDomain: "a.example", Proved: "a.example"}
	edit := func(f func(c *Catalog)) *Catalog { c := testCatalog(); f(c); return c }
	cases := []struct {
		name   string
		c      *Catalog
		peer   PeerClaim
		last   uint64
		reason string // "" means accepted
	}{
		{"good", testCatalog(), peer, 2, ""},
		{"another mesh's ID", edit(func(c *Catalog) { c.Mesh = "mesh-c" }), peer, 0, ReasonMesh},
		{"another trust domain", edit(func(c *Catalog) { c.TrustDomain = "c.example" }), peer, 0, ReasonTrustDomain},
		{"stream proved another domain", testCatalog(), PeerClaim{Mesh: "mesh-a", TrustDomain: "a.example", Proved: "c.example"}, 0, ReasonTrustDomain},
		{"stale", testCatalog(), peer, 4, ReasonStale},
		{"duplicate", edit(func(c *Catalog) { c.Services = append(c.Services, c.Services[0]) }), peer, 0, ReasonInvalid},
		{"bad gateway", edit(func(c *Catalog) { c.Services[0].Gateways = []string{"0.0.0.0:15443"} }), peer, 0, ReasonInvalid},
		{"no gateway", edit(func(c *Catalog) { c.Services[0].Gateways = nil }), peer, 0, ReasonInvalid},
		{"bad protocol", edit(func(c *Catalog) { c.Services[0].Ports[0].Protocol = "QUIC" }), peer, 0, ReasonInvalid},
		{"bad name", edit(func(c *Catalog) { c.Services[0].Name = "Echo_1" }), peer, 0, ReasonInvalid},
		{"port zero", edit(func(c *Catalog) { c.Services[0].Ports[0].Port = 0 }), peer, 0, ReasonInvalid},
		{"no identities", edit(func(c *Catalog) { c.Services[0].Identities = nil }), peer, 0, ""},
		{"identity not SPIFFE", edit(func(c *Catalog) { c.Services[0].Identities = []string{"echo"} }), peer, 0, ReasonInvalid},
		{"identity of another shape", edit(func(c *Catalog) { c.Services[0].Identities = []string{"spiffe://a.example/echo"} }), peer, 0, ReasonInvalid},
		{"identity twice", edit(func(c *Catalog) {
			c.Services[0].Identities = append(c.Services[0].Identities, c.Services[0].Identities[0])
		}), peer, 0, ReasonInvalid},
		{"identity not canonical", edit(func(c *Catalog) { c.Services[0].Identities = []string{"spiffe://A.example/ns/demo/sa/echo"} }), peer, 0, ReasonInvalid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b, _ := json.Marshal(c.c)
			got, err := DecodeCatalog(b)
			if err == nil {
				_, _, err = CheckReceived(got, c.peer, "mesh-b", c.last)
			}
			if c.reason == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var ce *CatalogError
			if !errors.As(err, &ce) || ce.Reason != c.reason {
				t.Fatalf("got %v, want a %q refusal", err, c.reason)
			}
		})
	}
}

// TestCatalogEntryNotExported: an entry naming a service not exported to the importer is
// refused alone, with its own error; the rest of the catalog is applied; the input is not
// modified.
func TestCatalogEntryNotExported(t *testing.T) {
	peer := PeerClaim{Mesh: "mesh-a", TrustDomain: "a.example", Proved: "a.example"}
	c := testCatalog()
	other := c.Services[0]
	other.Name, other.Consumers = "secret", []mesh.MeshID{"mesh-c"}
	c.Services = append(c.Services, other)
	apply, refused, err := CheckReceived(c, peer, "mesh-b", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(apply.Services) != 1 || apply.Services[0].Name != "echo" || apply.Sequence != c.Sequence {
		t.Fatalf("applied %+v", apply)
	}
	if len(refused) != 1 || RefusalReason(refused[0]) != ReasonNotExported || !strings.Contains(refused[0].Error(), "demo/secret, which it does not export to mesh-b") {
		t.Fatalf("refused %v", refused)
	}
	if len(c.Services) != 2 {
		t.Fatal("CheckReceived modified its input")
	}
	// Nothing exported to us at all: an empty import, every entry refused.
	c.Services = c.Services[1:]
	apply, refused, err = CheckReceived(c, peer, "mesh-b", 0)
	if err != nil || len(apply.Services) != 0 || len(refused) != 1 {
		t.Fatalf("%+v %v %v", apply, refused, err)
	}
}

// TestCatalogEntryForeignIdentity: an entry listing a service account outside the
// exporter's trust domain (a peer claiming another mesh's workloads) is refused alone with
// its own error (ReasonIdentity); the rest is applied with its identities.
func TestCatalogEntryForeignIdentity(t *testing.T) {
	peer := PeerClaim{Mesh: "mesh-a", TrustDomain: "a.example", Proved: "a.example"}
	c := testCatalog()
	other := c.Services[0]
	other.Name, other.Identities = "spoof", []string{"spiffe://a.example/ns/demo/sa/ok", "spiffe://b.example/ns/demo/sa/echo"}
	c.Services = append(c.Services, other)
	apply, refused, err := CheckReceived(c, peer, "mesh-b", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(apply.Services) != 1 || apply.Services[0].Name != "echo" {
		t.Fatalf("applied %+v", apply.Services)
	}
	if len(refused) != 1 || RefusalReason(refused[0]) != ReasonIdentity ||
		!strings.Contains(refused[0].Error(), "lists identity spiffe://b.example/ns/demo/sa/echo for demo/spoof, outside its trust domain a.example") {
		t.Fatalf("refused %v", refused)
	}
	imps := importsOf(apply)
	if len(imps) != 1 || len(imps[0].Identities) != 1 || imps[0].Identities[0].String() != "spiffe://a.example/ns/demo/sa/echo" {
		t.Fatalf("imports %+v", imps)
	}
}

func TestDecodeCatalogStrict(t *testing.T) {
	b, _ := json.Marshal(testCatalog())
	for name, in := range map[string]string{
		"unknown field": strings.Replace(string(b), "{", `{"extra":1,`, 1),
		"trailing":      string(b) + "{}",
		"truncated":     string(b[:len(b)-5]),
		"huge":          strings.Repeat(" ", maxCatalogBytes+1),
	} {
		if _, err := DecodeCatalog([]byte(in)); RefusalReason(err) != ReasonInvalid || err == nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestImportHostname(t *testing.T) {
	if got := ImportHostname("mesh-a", mesh.ServiceKey{Namespace: "demo", Name: "echo"}); got != "echo.demo.svc.mesh-a.isthmus" {
		t.Fatal(got)
	}
}

// FuzzCatalog: arbitrary bytes never panic the decoder; whatever decodes re-encodes and
// decodes to the same catalog, and every refusal is a CatalogError.
func FuzzCatalog(f *testing.F) {
	b, _ := json.Marshal(testCatalog())
	f.Add(b)
	f.Add([]byte(`{"mesh":"m","trustDomain":"t","services":[]}`))
	f.Add([]byte(`{}`))
	mixed := testCatalog()
	other := mixed.Services[0]
	other.Name, other.Consumers = "secret", []mesh.MeshID{"mesh-c", "mesh-b-2"}
	mixed.Services = append(mixed.Services, other)
	b, _ = json.Marshal(mixed)
	f.Add(b)
	foreign := testCatalog()
	foreign.Services[0].Identities = []string{"spiffe://a.example/ns/demo/sa/echo", "spiffe://c.example/ns/demo/sa/echo"}
	b, _ = json.Marshal(foreign)
	f.Add(b)
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := DecodeCatalog(in)
		if err != nil {
			var ce *CatalogError
			if !errors.As(err, &ce) {
				t.Fatalf("not a CatalogError: %v", err)
			}
			return
		}
		again, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		back, err := DecodeCatalog(again)
		if err != nil {
			t.Fatalf("re-encoded catalog refused: %v", err)
		}
		apply, refused, err := CheckReceived(back, PeerClaim{Mesh: c.Mesh, TrustDomain: c.TrustDomain, Proved: c.TrustDomain}, "mesh-b", 0)
		if err != nil {
			t.Fatalf("the peer's own valid catalog refused whole: %v", err)
		}
		// Every entry is either applied or refused with its own error, never both.
		if len(apply.Services)+len(refused) != len(back.Services) {
			t.Fatalf("%d services: %d applied, %d refused", len(back.Services), len(apply.Services), len(refused))
		}
		for _, s := range apply.Services {
			if !slices.Contains(s.Consumers, "mesh-b") {
				t.Fatalf("applied %s/%s, not exported to mesh-b", s.Namespace, s.Name)
			}
			if id := foreignIdentity(s.Identities, c.TrustDomain); id != "" {
				t.Fatalf("applied %s/%s with identity %s outside %s", s.Namespace, s.Name, id, c.TrustDomain)
			}
		}
		for _, r := range refused {
			if reason := RefusalReason(r); reason != ReasonNotExported && reason != ReasonIdentity {
				t.Fatalf("entry refused as %q", reason)
			}
		}
	})
}
