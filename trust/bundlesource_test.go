package trust_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// selfSigned mints a certificate outside the package's issue path, for the shapes NewRoot
// never makes: expired, not a CA, naming another trust domain.
func selfSigned(t testing.TB, isCA bool, notAfter time.Time, uri string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "test"},
		NotBefore: notAfter.Add(-time.Hour), NotAfter: notAfter, IsCA: isCA, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	if uri != "" {
		u, _ := url.Parse(uri)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestParseAndCheckPEMBundle reads PEM roots into a bundle and checks them, as `trust
// bundle add --pem` does: every bad input is refused with a precise error, never a panic.
func TestParseAndCheckPEMBundle(t *testing.T) {
	east, err := trust.NewRoot("east.example", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	east2, _ := trust.NewRoot("east.example", trust.RootOptions{})
	files, _ := east.PluggedFiles()
	root := east.RootPEM()
	later := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		name  string
		td    mesh.TrustDomain
		data  []byte
		roots int    // on success
		err   string // substring of the error; "" for success
		bad   bool   // the refusal is CheckBundle's (wraps ErrBadBundle)
	}{
		{name: "one root", td: "east.example", data: root, roots: 1},
		{name: "two roots with a key between", td: "east.example", data: append(append(root, files[trust.CAKeyFile]...), east2.RootPEM()...), roots: 2},
		{name: "a foreign root without a SPIFFE URI", td: "east.example", data: selfSigned(t, true, later, ""), roots: 1},
		{name: "empty", td: "east.example", data: nil, err: "no PEM certificate"},
		{name: "garbage", td: "east.example", data: []byte("not a certificate\x00\xff"), err: "no PEM certificate"},
		{name: "truncated PEM", td: "east.example", data: root[:len(root)/2], err: "no PEM certificate"},
		{name: "corrupt DER", td: "east.example", data: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x03, 1, 2, 3}}), err: "PEM bundle of east.example"},
		{name: "key only", td: "east.example", data: files[trust.CAKeyFile], err: "no PEM certificate"},
		{name: "bad trust domain", td: "Bad_Domain", data: root, err: "PEM bundle"},
		{name: "not a CA", td: "east.example", data: selfSigned(t, false, later, ""), err: "is not a CA", bad: true},
		{name: "expired", td: "east.example", data: selfSigned(t, true, time.Now().Add(-time.Minute), ""), err: "expired at", bad: true},
		{name: "wrong trust domain", td: "west.example", data: root, err: "is the root of east.example", bad: true},
		{name: "wrong trust domain by URI", td: "east.example", data: selfSigned(t, true, later, "spiffe://west.example"), err: "is the root of west.example", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := trust.ParsePEMBundle(tc.td, tc.data)
			if err == nil {
				err = trust.CheckBundle(tc.td, b, time.Now())
			}
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				if n := len(b.X509Authorities()); n != tc.roots {
					t.Fatalf("%d roots, want %d", n, tc.roots)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("error %v, want one containing %q", err, tc.err)
			}
			if errors.Is(err, trust.ErrBadBundle) != tc.bad {
				t.Fatalf("errors.Is(%v, ErrBadBundle) = %v, want %v", err, !tc.bad, tc.bad)
			}
		})
	}
}

// TestReadBundle reads a bundle from each kind of source `trust bundle add` offers, and
// refuses a missing, doubled or unreadable source.
func TestReadBundle(t *testing.T) {
	dir := t.TempDir()
	east, _ := trust.NewRoot("east.example", trust.RootOptions{})
	caDir := filepath.Join(dir, "ca")
	if err := east.WriteDir(caDir); err != nil {
		t.Fatal(err)
	}
	local, err := trust.LocalBundle(east, 3, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	jwks, err := local.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	jwksFile := write("east.json", jwks)
	pemFile := write("east.pem", east.RootPEM())
	junk := write("junk", []byte("{not json"))

	// A bundle endpoint whose TLS certificate comes from a CA given by file.
	set := trust.NewBundleSet()
	set.Set(local)
	web, _ := trust.NewRoot("web.test", trust.RootOptions{})
	tc, err := web.ServingCertificate([]string{"localhost"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(trust.BundleHandler(set, "east.example"))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{tc}}
	srv.StartTLS()
	defer srv.Close()
	endpoint := strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)
	webCA := write("web-ca.pem", web.RootPEM())

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		td   mesh.TrustDomain
		src  trust.BundleSource
		err  string
	}{
		{name: "JWKS file", td: "east.example", src: trust.BundleSource{File: jwksFile}},
		{name: "PEM file", td: "east.example", src: trust.BundleSource{PEMFile: pemFile}},
		{name: "CA directory", td: "east.example", src: trust.BundleSource{CADir: caDir}},
		{name: "endpoint", td: "east.example", src: trust.BundleSource{Endpoint: endpoint, EndpointCA: webCA}},
		{name: "no source", td: "east.example", err: "got 0"},
		{name: "two sources", td: "east.example", src: trust.BundleSource{PEMFile: pemFile, CADir: caDir}, err: "got 2"},
		{name: "missing file", td: "east.example", src: trust.BundleSource{PEMFile: filepath.Join(dir, "missing.pem")}, err: "no such file"},
		{name: "JWKS garbage", td: "east.example", src: trust.BundleSource{File: junk}, err: "bundle file " + junk},
		{name: "PEM garbage", td: "east.example", src: trust.BundleSource{PEMFile: junk}, err: "(in " + junk + ")"},
		{name: "endpoint CA garbage", td: "east.example", src: trust.BundleSource{Endpoint: endpoint, EndpointCA: junk}, err: "no PEM certificate"},
		{name: "endpoint not trusted", td: "east.example", src: trust.BundleSource{Endpoint: endpoint, EndpointCA: pemFile}, err: "certificate"},
		// Without a CA the system's roots are used, and they do not hold web.test's.
		{name: "endpoint not trusted by the system", td: "east.example", src: trust.BundleSource{Endpoint: endpoint}, err: "certificate"},
		{name: "wrong trust domain", td: "west.example", src: trust.BundleSource{CADir: caDir}, err: "is the root of east.example"},
		{name: "bad trust domain", td: "Bad_Domain", src: trust.BundleSource{CADir: caDir}, err: "trust domain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := trust.ReadBundle(ctx, tc.td, tc.src)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := b.X509Authorities(); len(got) != 1 || !got[0].Equal(east.Root) {
				t.Fatalf("roots %v, want east's root", got)
			}
		})
	}
}

// FuzzParsePEMBundle feeds the PEM bundle reader arbitrary bytes: it never panics, and a
// bundle it accepts holds at least one parsed root.
func FuzzParsePEMBundle(f *testing.F) {
	root, err := trust.NewRoot("east.example", trust.RootOptions{})
	if err != nil {
		f.Fatal(err)
	}
	files, _ := root.PluggedFiles()
	f.Add(root.RootPEM())
	f.Add(files[trust.CertChainFile])
	f.Add(files[trust.CAKeyFile])
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := trust.ParsePEMBundle("east.example", data)
		if err != nil {
			return
		}
		roots := b.X509Authorities()
		if len(roots) == 0 {
			t.Fatal("accepted a bundle without a root")
		}
		for _, c := range roots {
			if c == nil || len(c.Raw) == 0 {
				t.Fatal("accepted an unparsed certificate")
			}
		}
		_ = trust.CheckBundle("east.example", b, time.Now()) // must not panic either
	})
}
