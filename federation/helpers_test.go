package federation

import (
	"crypto/x509"
	"testing"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// testRoot makes a real root CA for td with the trust package.
func testRoot(t testing.TB, td mesh.TrustDomain) *trust.Authority {
	t.Helper()
	a, err := trust.NewRoot(td, trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func roots(as ...*trust.Authority) []*x509.Certificate {
	var out []*x509.Certificate
	for _, a := range as {
		out = append(out, a.Root)
	}
	return out
}
