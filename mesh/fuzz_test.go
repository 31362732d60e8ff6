package mesh

import "testing"

// Each fuzz target checks that a parser never panics and that whatever it accepts prints
// back to a string that parses to the same value.

func FuzzParseClusterID(f *testing.F) {
	for _, s := range []string{"cluster-1", "Kubernetes", "", "-", "a.b_c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		c, err := ParseClusterID(s)
		if err != nil {
			return
		}
		if c2, err := ParseClusterID(c.String()); err != nil || c2 != c {
			t.Fatalf("round trip %q: %q, %v", s, c2, err)
		}
		// Network and mesh IDs share the label-value grammar.
		if _, err := ParseNetworkID(s); err != nil {
			t.Fatalf("cluster ID %q accepted but network ID refused: %v", s, err)
		}
		if _, err := ParseMeshID(s); err != nil {
			t.Fatalf("cluster ID %q accepted but mesh ID refused: %v", s, err)
		}
	})
}

func FuzzParseTrustDomain(f *testing.F) {
	for _, s := range []string{"cluster.local", "", "A", "x_y-z.0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		td, err := ParseTrustDomain(s)
		if err != nil {
			return
		}
		if td2, err := ParseTrustDomain(td.String()); err != nil || td2 != td {
			t.Fatalf("round trip %q: %q, %v", s, td2, err)
		}
	})
}

func FuzzParseIdentity(f *testing.F) {
	for _, s := range []string{"spiffe://cluster.local/ns/demo/sa/echo", "spiffe://", "spiffe://a/ns//sa/b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseIdentity(s)
		if err != nil {
			return
		}
		if id.String() != s {
			t.Fatalf("ParseIdentity(%q).String() = %q", s, id.String())
		}
		if id2, err := ParseIdentity(id.String()); err != nil || id2 != id {
			t.Fatalf("round trip %q: %+v, %v", s, id2, err)
		}
	})
}

func FuzzParseHostname(f *testing.F) {
	for _, s := range []string{"echo.demo.svc.cluster.local", "*.a.b", "a.", "", ".."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseHostname(s)
		if err != nil {
			return
		}
		if h2, err := ParseHostname(h.String()); err != nil || h2 != h {
			t.Fatalf("round trip %q: %q, %v", s, h2, err)
		}
		if k, err := ServiceKeyFromHostname(h, ""); err == nil && k.Hostname("") != h {
			t.Fatalf("service key %v of %q prints back as %q", k, h, k.Hostname(""))
		}
	})
}

func FuzzParseLocality(f *testing.F) {
	for _, s := range []string{"r/z/s", "r", "", "r//", "/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseLocality(s)
		if err != nil {
			return
		}
		if l.String() != s {
			t.Fatalf("ParseLocality(%q).String() = %q", s, l.String())
		}
	})
}

// FuzzOutboundName: whatever ParseSNI or ParseClusterName accepts prints back, in both
// spellings, to strings that parse to the same name; so a gateway that routes on the SNI
// finds the cluster the primary named.
func FuzzOutboundName(f *testing.F) {
	for _, s := range []string{
		"outbound_.8080_._.echo.demo.svc.cluster.local", "outbound_.9090_.v2_.a.b", "outbound_.80", "outbound_.0_._.a",
		"outbound|8080||echo.demo.svc.cluster.local", "outbound|80|v1|a.b.", "inbound|80||a", "outbound|||", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		check := func(from string, n OutboundName) {
			if n.Port == 0 || n.Host == "" {
				t.Fatalf("%s accepted %q as %+v, which has no port or host", from, s, n)
			}
			if n2, err := ParseSNI(n.SNI()); err != nil || n2 != n {
				t.Fatalf("%s(%q) = %+v; its SNI %q parses to %+v, %v", from, s, n, n.SNI(), n2, err)
			}
			if n2, err := ParseClusterName(n.ClusterName()); err != nil || n2 != n {
				t.Fatalf("%s(%q) = %+v; its cluster name %q parses to %+v, %v", from, s, n, n.ClusterName(), n2, err)
			}
		}
		if n, err := ParseSNI(s); err == nil {
			check("ParseSNI", n)
		}
		if n, err := ParseClusterName(s); err == nil {
			check("ParseClusterName", n)
		}
	})
}
