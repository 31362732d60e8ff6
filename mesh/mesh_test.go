package mesh

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseIDs(t *testing.T) {
	type parser func(string) (string, error)
	wrap := func(f func(string) (ClusterID, error)) parser {
		return func(s string) (string, error) { v, err := f(s); return string(v), err }
	}
	parsers := map[string]parser{
		"cluster": wrap(ParseClusterID),
		"network": func(s string) (string, error) { v, err := ParseNetworkID(s); return string(v), err },
		"mesh":    func(s string) (string, error) { v, err := ParseMeshID(s); return string(v), err },
	}
	tests := []struct {
		name, in string
		wantErr  string
	}{
		{"simple", "cluster-1", ""},
		{"istio default", "Kubernetes", ""},
		{"dots and underscores", "us_east.1", ""},
		{"single char", "a", ""},
		{"empty", "", "empty"},
		{"leading dash", "-a", "begin and end"},
		{"trailing dot", "a.", "begin and end"},
		{"slash", "a/b", `character '/'`},
		{"space", "a b", `character ' '`},
		{"too long", strings.Repeat("a", 64), "longer than 63"},
		{"max length", strings.Repeat("a", 63), ""},
	}
	for pname, parse := range parsers {
		for _, tt := range tests {
			t.Run(pname+"/"+tt.name, func(t *testing.T) {
				got, err := parse(tt.in)
				if tt.wantErr == "" {
					if err != nil || got != tt.in {
						t.Fatalf("parse(%q) = %q, %v; want ok", tt.in, got, err)
					}
					return
				}
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parse(%q) error = %v; want it to mention %q", tt.in, err, tt.wantErr)
				}
				var pe *ParseError
				if !errors.As(err, &pe) {
					t.Fatalf("error %T is not a *ParseError", err)
				}
			})
		}
	}
}

func TestParseTrustDomain(t *testing.T) {
	tests := []struct {
		name, in string
		ok       bool
	}{
		{"istio default", "cluster.local", true},
		{"with underscore", "example_org", true},
		{"uppercase refused", "Example.org", false},
		{"empty", "", false},
		{"port refused", "example.org:443", false},
		{"too long", strings.Repeat("a", 256), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			td, err := ParseTrustDomain(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("ParseTrustDomain(%q) = %q, %v; want ok=%v", tt.in, td, err, tt.ok)
			}
			if tt.ok && td.IDString() != "spiffe://"+tt.in {
				t.Fatalf("IDString = %q", td.IDString())
			}
		})
	}
}

func TestParseIdentity(t *testing.T) {
	tests := []struct {
		name, in string
		want     Identity
		wantErr  string
	}{
		{"istio form", "spiffe://cluster.local/ns/demo/sa/echo",
			Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"}, ""},
		{"dotted sa", "spiffe://td/ns/a/sa/b.c", Identity{TrustDomain: "td", Namespace: "a", ServiceAccount: "b.c"}, ""},
		{"empty", "", Identity{}, "empty"},
		{"wrong scheme", "https://td/ns/a/sa/b", Identity{}, "spiffe://"},
		{"no path", "spiffe://td", Identity{}, "no path"},
		{"other path", "spiffe://td/workload/x", Identity{}, "is not /ns/"},
		{"extra segment", "spiffe://td/ns/a/sa/b/c", Identity{}, "is not /ns/"},
		{"bad namespace", "spiffe://td/ns/A/sa/b", Identity{}, "namespace"},
		{"empty sa", "spiffe://td/ns/a/sa/", Identity{}, "service account"},
		{"bad td", "spiffe://T D/ns/a/sa/b", Identity{}, "trust domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseIdentity(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseIdentity(%q) error = %v; want %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseIdentity(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			}
			if got.String() != tt.in {
				t.Fatalf("String() = %q; want %q", got.String(), tt.in)
			}
		})
	}
	if (Identity{}).String() != "" {
		t.Fatal("zero identity must print empty")
	}
}

func TestHostnameAndServiceKey(t *testing.T) {
	k, err := NewServiceKey("demo", "echo")
	if err != nil {
		t.Fatal(err)
	}
	h := k.Hostname("")
	if h != "echo.demo.svc.cluster.local" {
		t.Fatalf("Hostname = %q", h)
	}
	back, err := ServiceKeyFromHostname(h, "")
	if err != nil || back != k {
		t.Fatalf("ServiceKeyFromHostname = %v, %v", back, err)
	}
	if _, err := ServiceKeyFromHostname("echo.demo.svc.example.org", ""); err == nil {
		t.Fatal("want error for a hostname outside the domain")
	}
	if _, err := ServiceKeyFromHostname("demo.svc.cluster.local", ""); err == nil {
		t.Fatal("want error for a hostname without a namespace")
	}
	for _, bad := range []string{"", "Echo.demo", "a..b", "-a.b", strings.Repeat("a", 64) + ".b"} {
		if _, err := ParseHostname(bad); err == nil {
			t.Errorf("ParseHostname(%q) accepted", bad)
		}
	}
	for in, want := range map[string]Hostname{
		"echo.demo.svc.cluster.local.": "echo.demo.svc.cluster.local",
		"*.example.com":                "*.example.com",
		"localhost":                    "localhost",
	} {
		if got, err := ParseHostname(in); err != nil || got != want {
			t.Errorf("ParseHostname(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := NewServiceKey("demo", "Echo"); err == nil {
		t.Fatal("want error for an uppercase service name")
	}
}

func TestParseLocality(t *testing.T) {
	tests := []struct {
		in      string
		want    Locality
		wantErr bool
	}{
		{"", Locality{}, false},
		{"us-east1", Locality{Region: "us-east1"}, false},
		{"us-east1/us-east1-b", Locality{Region: "us-east1", Zone: "us-east1-b"}, false},
		{"r/z/s", Locality{Region: "r", Zone: "z", Subzone: "s"}, false},
		{"r//s", Locality{}, true},
		{"r/z/s/x", Locality{}, true},
		{"r/z z", Locality{}, true},
	}
	for _, tt := range tests {
		got, err := ParseLocality(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseLocality(%q) = %+v, %v; want %+v, err=%v", tt.in, got, err, tt.want, tt.wantErr)
		}
		if err == nil && got.String() != tt.in {
			t.Errorf("String() = %q; want %q", got.String(), tt.in)
		}
	}
}

func TestEndpointValidate(t *testing.T) {
	good := Endpoint{
		Address: netip.MustParseAddr("10.0.0.5"),
		Ports:   []Port{{Name: "grpc", Number: 8080, Protocol: ProtocolGRPC}},
		Cluster: "c1",
		Network: "n1",
	}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	if ap, ok := good.AddrPort("grpc"); !ok || ap.String() != "10.0.0.5:8080" {
		t.Fatalf("AddrPort = %v, %v", ap, ok)
	}
	if _, ok := good.AddrPort("http"); ok {
		t.Fatal("AddrPort found a port that does not exist")
	}
	if good.EffectiveWeight() != 1 || good.String() != "10.0.0.5@c1/n1" {
		t.Fatalf("weight %d, string %q", good.EffectiveWeight(), good.String())
	}
	tests := map[string]func(*Endpoint){
		"no address":     func(e *Endpoint) { e.Address = netip.Addr{} },
		"no cluster":     func(e *Endpoint) { e.Cluster = "" },
		"zero port":      func(e *Endpoint) { e.Ports = []Port{{Name: "x"}} },
		"duplicate port": func(e *Endpoint) { e.Ports = []Port{{Name: "x", Number: 1}, {Name: "x", Number: 2}} },
	}
	for name, mutate := range tests {
		t.Run(name, func(t *testing.T) {
			e := good
			mutate(&e)
			if err := e.Validate(); err == nil {
				t.Fatal("Validate accepted a broken endpoint")
			}
		})
	}
	if HealthUnknown.String() != "unknown" || HealthHealthy.String() != "healthy" {
		t.Fatal("Health.String")
	}
}
