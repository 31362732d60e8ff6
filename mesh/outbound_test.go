package mesh

import (
	"errors"
	"strings"
	"testing"
)

func TestOutboundNameRoundTrip(t *testing.T) {
	tests := []struct {
		name         string
		n            OutboundName
		sni, cluster string
	}{
		{"whole service", OutboundName{Port: 8080, Host: "echo.demo.svc.cluster.local"},
			"outbound_.8080_._.echo.demo.svc.cluster.local", "outbound|8080||echo.demo.svc.cluster.local"},
		{"subset", OutboundName{Port: 9090, Subset: "v2", Host: "api.x.svc.cluster.local"},
			"outbound_.9090_.v2_.api.x.svc.cluster.local", "outbound|9090|v2|api.x.svc.cluster.local"},
		{"lowest port", OutboundName{Port: 1, Host: "a"}, "outbound_.1_._.a", "outbound|1||a"},
		{"highest port", OutboundName{Port: 65535, Subset: "x-1", Host: "a.b"}, "outbound_.65535_.x-1_.a.b", "outbound|65535|x-1|a.b"},
		{"wildcard host", OutboundName{Port: 443, Host: "*.example.com"}, "outbound_.443_._.*.example.com", "outbound|443||*.example.com"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.n.SNI(); got != tt.sni {
				t.Errorf("SNI() = %q; want %q", got, tt.sni)
			}
			if got := tt.n.ClusterName(); got != tt.cluster {
				t.Errorf("ClusterName() = %q; want %q", got, tt.cluster)
			}
			if got, err := ParseSNI(tt.sni); err != nil || got != tt.n {
				t.Errorf("ParseSNI(%q) = %+v, %v; want %+v", tt.sni, got, err, tt.n)
			}
			if got, err := ParseClusterName(tt.cluster); err != nil || got != tt.n {
				t.Errorf("ParseClusterName(%q) = %+v, %v; want %+v", tt.cluster, got, err, tt.n)
			}
		})
	}
}

func TestParseOutboundNameErrors(t *testing.T) {
	const sni, cluster = "cross-network SNI", "outbound cluster name"
	parsers := map[string]func(string) (OutboundName, error){sni: ParseSNI, cluster: ParseClusterName}
	tests := []struct{ name, kind, in, wantErr string }{
		{"empty", sni, "", "empty"},
		{"plain hostname", sni, "echo.demo.svc", "want outbound_."},
		{"no port separator", sni, "outbound_.80", `no "_." after the port`},
		{"no subset separator", sni, "outbound_.80_.a.b", `no "_." after the subset`},
		{"zero port", sni, "outbound_.0_._.a.b", "leading zero"},
		{"leading zero", sni, "outbound_.080_._.a.b", "leading zero"},
		{"port too large", sni, "outbound_.70000_._.a.b", "larger than 65535"},
		{"port not a number", sni, "outbound_.x_._.a", "not a digit"},
		{"signed port", sni, "outbound_.+80_._.a", "not a digit"},
		{"empty port", sni, "outbound_._._.a", `port "": empty`},
		{"empty hostname", sni, "outbound_.80_._.", "hostname"},
		{"bad hostname", sni, "outbound_.80_._.A..b", "hostname"},
		{"bad subset", sni, "outbound_.80_.V1_.a.b", "subset"},
		{"subset with a bar", sni, "outbound_.80_.a|b_.a.b", "subset"},

		{"empty", cluster, "", "empty"},
		{"too few parts", cluster, "outbound|80|a.b", "have 3"},
		{"too many parts", cluster, "outbound|80||a.b|x", "have 5"},
		{"inbound", cluster, "inbound|80||a.b", `direction "inbound"`},
		{"an SNI", cluster, "outbound_.80_._.a.b", "have 1"},
		{"bad port", cluster, "outbound|http||a.b", "not a digit"},
		{"bad subset", cluster, "outbound|80|v_1|a.b", "subset"},
		{"no hostname", cluster, "outbound|80||", "hostname"},
	}
	for _, tt := range tests {
		t.Run(tt.kind+"/"+tt.name, func(t *testing.T) {
			n, err := parsers[tt.kind](tt.in)
			if err == nil {
				t.Fatalf("parse %s %q = %+v; want an error", tt.kind, tt.in, n)
			}
			var pe *ParseError
			if !errors.As(err, &pe) || pe.Kind != tt.kind || pe.Input != tt.in {
				t.Fatalf("error %#v is not a ParseError about the input", err)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("parse %s %q error = %v; want it to mention %q", tt.kind, tt.in, err, tt.wantErr)
			}
		})
	}
}
