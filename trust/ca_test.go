package trust

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func newCSR(t testing.TB, uris ...string) (*x509.CertificateRequest, *ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		pu, _ := url.Parse(u)
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	return csr, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func mustIdentity(t testing.TB, s string) mesh.Identity {
	id, err := mesh.ParseIdentity(s)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func chainOf(t testing.TB, pems []string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, p := range pems {
		c, err := parseCerts([]byte(p))
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c...)
	}
	return out
}

func verify(leaf *x509.Certificate, root *x509.Certificate, inter ...*x509.Certificate) error {
	roots := x509.NewCertPool()
	roots.AddCert(root)
	ip := x509.NewCertPool()
	for _, c := range inter {
		ip.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: ip, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

func TestRootIntermediateLeafChain(t *testing.T) {
	root, err := NewRoot("example.org", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate(IntermediateOptions{Cluster: "east"})
	if err != nil {
		t.Fatal(err)
	}
	csr, _, _ := newCSR(t, "spiffe://example.org/ns/demo/sa/echo")
	chainPEM, err := inter.Sign(context.Background(), csr, mustIdentity(t, "spiffe://example.org/ns/demo/sa/echo"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	chain := chainOf(t, chainPEM)
	if len(chain) != 3 || !chain[2].Equal(root.Cert) || !chain[1].Equal(inter.Cert) {
		t.Fatalf("chain must be leaf, intermediate, root; got %d certificates", len(chain))
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://example.org/ns/demo/sa/echo" || len(leaf.DNSNames) != 0 {
		t.Fatalf("leaf names: %v %v", leaf.URIs, leaf.DNSNames)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d < time.Hour || d > time.Hour+2*time.Minute {
		t.Fatalf("leaf validity %s", d)
	}
	if err := verify(leaf, root.Cert, inter.Cert); err != nil {
		t.Fatal(err)
	}

	// A CSR without names gets the caller's identity filled in.
	bare, _, _ := newCSR(t)
	if _, err := inter.Sign(context.Background(), bare, mustIdentity(t, "spiffe://example.org/ns/demo/sa/echo"), time.Hour); err != nil {
		t.Fatal(err)
	}
	// Refusals.
	other, _, _ := newCSR(t, "spiffe://example.org/ns/demo/sa/admin")
	if _, err := inter.Sign(context.Background(), other, mustIdentity(t, "spiffe://example.org/ns/demo/sa/echo"), time.Hour); !errors.Is(err, ErrWrongIdentity) {
		t.Fatalf("CSR for another identity: %v", err)
	}
	if _, err := inter.Sign(context.Background(), csr, mustIdentity(t, "spiffe://other.org/ns/demo/sa/echo"), time.Hour); !errors.Is(err, ErrWrongIdentity) {
		t.Fatalf("identity in another trust domain: %v", err)
	}
	dnsTmpl := &x509.CertificateRequest{DNSNames: []string{"evil.example.com"}}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, dnsTmpl, key)
	dnsCSR, _ := x509.ParseCertificateRequest(der)
	if _, err := inter.Sign(context.Background(), dnsCSR, mustIdentity(t, "spiffe://example.org/ns/demo/sa/echo"), time.Hour); !errors.Is(err, ErrWrongIdentity) {
		t.Fatalf("CSR with DNS names: %v", err)
	}
}

// TestStolenIntermediateCannotMintAnotherDomain signs a leaf for another trust domain with
// the intermediate's key directly (as a thief would, bypassing Sign) and checks that the
// name constraint makes verification fail.
func TestStolenIntermediateCannotMintAnotherDomain(t *testing.T) {
	root, _ := NewRoot("example.org", RootOptions{})
	inter, _ := root.NewIntermediate(IntermediateOptions{Cluster: "east"})
	csr, _, _ := newCSR(t)
	u, _ := url.Parse("spiffe://bank.example/ns/payments/sa/api")
	tmpl := &x509.Certificate{SerialNumber: bigOne(), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{u}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, inter.Cert, csr.PublicKey, inter.Key)
	if err != nil {
		t.Fatal(err)
	}
	forged, _ := x509.ParseCertificate(der)
	err = verify(forged, root.Cert, inter.Cert)
	if err == nil || !strings.Contains(err.Error(), "constraint") {
		t.Fatalf("a leaf outside the trust domain verified: %v", err)
	}
}

func TestPluggedFilesRoundTrip(t *testing.T) {
	root, _ := NewRoot("example.org", RootOptions{})
	inter, _ := root.NewIntermediate(IntermediateOptions{Cluster: "east"})
	dir := t.TempDir()
	if err := inter.WriteDir(dir); err != nil {
		t.Fatal(err)
	}
	back, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Cert.Equal(inter.Cert) || !back.Root.Equal(root.Cert) || back.TrustDomain != "example.org" || len(back.Chain) != 1 {
		t.Fatalf("round trip: %+v", back)
	}
	rootDir := t.TempDir()
	root.WriteDir(rootDir)
	if r, err := LoadDir(rootDir); err != nil || r.Cert != r.Root {
		t.Fatalf("root round trip: %v", err)
	}
	files, _ := inter.PluggedFiles()
	other, _ := NewRoot("example.org", RootOptions{})
	bad := map[string]map[string][]byte{
		"key of another CA": {CACertFile: files[CACertFile], CAKeyFile: mustFiles(other)[CAKeyFile], RootCertFile: files[RootCertFile]},
		"foreign root":      {CACertFile: files[CACertFile], CAKeyFile: files[CAKeyFile], RootCertFile: other.RootPEM()},
		"garbage cert":      {CACertFile: []byte("junk"), CAKeyFile: files[CAKeyFile], RootCertFile: files[RootCertFile]},
		"no key":            {CACertFile: files[CACertFile], RootCertFile: files[RootCertFile]},
	}
	for name, f := range bad {
		if _, err := ParsePlugged(f); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func mustFiles(a *Authority) map[string][]byte {
	f, _ := a.PluggedFiles()
	return f
}

// TestSingleTrustAcrossClusters: a workload with a certificate from cluster A's intermediate
// completes mTLS with a workload whose certificate comes from cluster B's intermediate,
// both trusting only the shared root.
func TestSingleTrustAcrossClusters(t *testing.T) {
	root, _ := NewRoot("cluster.local", RootOptions{})
	a, _ := root.NewIntermediate(IntermediateOptions{Cluster: "a"})
	b, _ := root.NewIntermediate(IntermediateOptions{Cluster: "b"})
	certFor := func(ca *Authority, id string) tls.Certificate {
		csr, key, _ := newCSR(t, id)
		chain, err := ca.Sign(context.Background(), csr, mustIdentity(t, id), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		var c tls.Certificate
		for _, p := range chain[:len(chain)-1] { // the root is not sent
			blk, _ := pem.Decode([]byte(p))
			c.Certificate = append(c.Certificate, blk.Bytes)
		}
		c.PrivateKey = key
		return c
	}
	pool := x509.NewCertPool()
	pool.AddCert(root.Cert)
	server := certFor(b, "spiffe://cluster.local/ns/demo/sa/server")
	client := certFor(a, "spiffe://cluster.local/ns/demo/sa/client")
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{server}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	peerID := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		tc := c.(*tls.Conn)
		if tc.Handshake() == nil {
			peerID <- tc.ConnectionState().PeerCertificates[0].URIs[0].String()
		}
		io.WriteString(tc, "ok")
		tc.Close()
	}()
	conn, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{Certificates: []tls.Certificate{client}, RootCAs: pool,
		InsecureSkipVerify: true, // SPIFFE peers are checked by URI, not host name:
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, _ := x509.ParseCertificate(raw[0])
			var inter []*x509.Certificate
			for _, r := range raw[1:] {
				c, _ := x509.ParseCertificate(r)
				inter = append(inter, c)
			}
			if err := verify(leaf, root.Cert, inter...); err != nil {
				return err
			}
			if leaf.URIs[0].String() != "spiffe://cluster.local/ns/demo/sa/server" {
				return errors.New("unexpected server identity")
			}
			return nil
		}})
	if err != nil {
		t.Fatalf("mTLS across intermediates: %v", err)
	}
	conn.Close()
	if got := <-peerID; got != "spiffe://cluster.local/ns/demo/sa/client" {
		t.Fatalf("server saw %q", got)
	}
}

func bigOne() *big.Int { return big.NewInt(1) }

// TestServingCertificate assembles the primary's CA serving certificate: a TLS pair whose
// leaf carries the control plane's names, verifies to the root through the intermediate
// it is sent with, and whose key is the leaf's.
func TestServingCertificate(t *testing.T) {
	root, err := NewRoot("example.org", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	names := ServingNames("istio-system", "cluster.local")
	want := []string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local", "isthmus-primary.istio-system.svc", "localhost"}
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Fatalf("ServingNames: %v, want %v", names, want)
	}
	for _, ca := range []*Authority{root, inter} {
		tc, err := ca.ServingCertificate(names, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(tc.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		// The leaf and the CAs under the root are sent, never the root: a client holds it.
		if wantLen := 1 + len(ca.Chain); len(tc.Certificate) != wantLen {
			t.Fatalf("CA %q: %d certificates sent, want %d", ca.Cert.Subject.CommonName, len(tc.Certificate), wantLen)
		}
		inters := x509.NewCertPool()
		for _, der := range tc.Certificate[1:] {
			c, _ := x509.ParseCertificate(der)
			inters.AddCert(c)
		}
		roots := x509.NewCertPool()
		roots.AddCert(root.Root)
		for _, n := range names {
			if _, err := leaf.Verify(x509.VerifyOptions{DNSName: n, Roots: roots, Intermediates: inters}); err != nil {
				t.Fatalf("CA %q, name %s: %v", ca.Cert.Subject.CommonName, n, err)
			}
		}
		if !publicKeysEqual(leaf.PublicKey, tc.PrivateKey.(interface{ Public() crypto.PublicKey }).Public()) {
			t.Fatal("the key is not the leaf's")
		}
		if d := leaf.NotAfter.Sub(leaf.NotBefore); d != time.Hour+clockSkew {
			t.Fatalf("validity %s, want ttl + clockSkew", d)
		}
	}
}

// TestPluggedSecret renders an intermediate as the Secret cacerts and reads it back.
func TestPluggedSecret(t *testing.T) {
	root, _ := NewRoot("example.org", RootOptions{})
	inter, err := root.NewIntermediate(IntermediateOptions{Cluster: "east"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := inter.PluggedSecret("istio-system", "east")
	if err != nil {
		t.Fatal(err)
	}
	if s.Kind != "Secret" || s.Name != SecretName || s.Namespace != "istio-system" || s.Labels["topology.istio.io/cluster"] != "east" {
		t.Fatalf("secret %s %s/%s labels %v", s.Kind, s.Namespace, s.Name, s.Labels)
	}
	back, err := ParsePlugged(s.Data)
	if err != nil {
		t.Fatal(err)
	}
	if !back.Cert.Equal(inter.Cert) || !back.Root.Equal(root.Cert) || back.TrustDomain != "example.org" {
		t.Fatalf("read back %q under %q for %s", back.Cert.Subject, back.Root.Subject, back.TrustDomain)
	}
}
