package trust

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// svid issues a TLS certificate (chain without the root) for id from ca.
func svid(t *testing.T, ca *Authority, id string) tls.Certificate {
	t.Helper()
	csr, key, _ := newCSR(t, id)
	chain, err := ca.Sign(context.Background(), csr, mustIdentity(t, id), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Certificate{PrivateKey: key}
	for _, p := range chain[:len(chain)-1] {
		b, _ := pem.Decode([]byte(p))
		c.Certificate = append(c.Certificate, b.Bytes)
	}
	return c
}

// serveTLS serves h over TLS on loopback and returns its https URL.
func serveTLS(t *testing.T, cert tls.Certificate, h http.Handler) string {
	t.Helper()
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "https://" + l.Addr().String() + "/bundle"
}

// mtls makes one handshake: the server holds serverCert and verifies clients with
// serverSet, the client holds clientCert and verifies the server with clientSet. It returns
// the identity the server saw.
func mtls(t *testing.T, serverCert tls.Certificate, serverSet *BundleSet, clientCert tls.Certificate, clientSet *BundleSet) (mesh.Identity, error) {
	t.Helper()
	seen := make(chan mesh.Identity, 1)
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{serverCert},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			id, err := serverSet.VerifyPeer(raw)
			if err == nil {
				seen <- id
			}
			return err
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.(*tls.Conn).Handshake()
		io.WriteString(c, "x")
		c.Close()
	}()
	c, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{
		Certificates:       []tls.Certificate{clientCert},
		InsecureSkipVerify: true, // SPIFFE identities are verified by VerifyPeerCertificate below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, err := clientSet.VerifyPeer(raw)
			return err
		},
	})
	if err != nil {
		return mesh.Identity{}, err
	}
	defer c.Close()
	// TLS 1.3 reports a client certificate refusal on the first read.
	if _, err := c.Read(make([]byte, 1)); err != nil {
		return mesh.Identity{}, err
	}
	select {
	case id := <-seen:
		return id, nil
	case <-time.After(5 * time.Second):
		return mesh.Identity{}, errors.New("server never verified the client")
	}
}

// TestMultiTrustFederation: two meshes with their own roots exchange bundles through
// bundle endpoints (https_web one way, https_spiffe the other, fetched with go-spiffe's
// federation client), and mTLS across the trust domains works only while each side holds
// the other's bundle. Bundles are never merged.
func TestMultiTrustFederation(t *testing.T) {
	rootA, _ := NewRoot("a.example", RootOptions{})
	rootB, _ := NewRoot("b.example", RootOptions{})
	interA, _ := rootA.NewIntermediate(IntermediateOptions{Cluster: "a1"})
	interB, _ := rootB.NewIntermediate(IntermediateOptions{Cluster: "b1"})
	setA, setB := NewBundleSet(), NewBundleSet()
	localA, _ := LocalBundle(interA, 1, time.Minute)
	localB, _ := LocalBundle(interB, 1, 200*time.Millisecond)
	setA.Set(localA)
	setB.Set(localB)

	// A's endpoint: https_web, with a certificate from a stand-in Web PKI.
	web, _ := NewRoot("web.test", RootOptions{})
	webCerts, webKey, _ := web.IssueServing([]string{"localhost"}, time.Hour)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(webKey)
	webTLS, err := tls.X509KeyPair(bytes.Join(webCerts, nil), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		t.Fatal(err)
	}
	urlA := strings.Replace(serveTLS(t, webTLS, BundleHandler(setA, "a.example")), "127.0.0.1", "localhost", 1)
	// B's endpoint: https_spiffe, with an SVID of b.example.
	endpointB := "spiffe://b.example/ns/istio-system/sa/bundle-endpoint"
	urlB := serveTLS(t, svid(t, interB, endpointB), BundleHandler(setB, "b.example"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	webPool := x509.NewCertPool()
	webPool.AddCert(web.Root)
	// B fetches A's bundle (https_web), with go-spiffe's client directly.
	gotA, err := federation.FetchBundle(ctx, spiffeid.RequireTrustDomainFromString("a.example"), urlA, federation.WithWebPKIRoots(webPool))
	if err != nil {
		t.Fatal(err)
	}
	if seq, ok := gotA.SequenceNumber(); !ok || seq != 1 {
		t.Fatalf("spiffe_sequence %d, %v", seq, ok)
	}
	if hint, ok := gotA.RefreshHint(); !ok || hint != time.Minute {
		t.Fatalf("spiffe_refresh_hint %s, %v", hint, ok)
	}
	setB.Set(gotA)
	// A fetches B's bundle (https_spiffe). The profile authenticates the endpoint with B's
	// bundle, which A must hold once (from an earlier fetch or out of band).
	bootstrap := NewBundleSet()
	bootstrap.Set(localB)
	gotB, err := FetchBundle(ctx, "b.example", urlB, FetchOptions{EndpointID: mustIdentity(t, endpointB), Bundles: bootstrap})
	if err != nil {
		t.Fatal(err)
	}
	setA.Set(gotB)
	if _, err := FetchBundle(ctx, "b.example", urlB, FetchOptions{EndpointID: mustIdentity(t, "spiffe://b.example/ns/x/sa/impostor"), Bundles: bootstrap}); err == nil {
		t.Fatal("https_spiffe accepted an endpoint with the wrong SPIFFE ID")
	}

	client := svid(t, interA, "spiffe://a.example/ns/shop/sa/frontend")
	server := svid(t, interB, "spiffe://b.example/ns/bank/sa/api")
	id, err := mtls(t, server, setB, client, setA)
	if err != nil {
		t.Fatalf("mTLS across trust domains with exchanged bundles: %v", err)
	}
	if id.String() != "spiffe://a.example/ns/shop/sa/frontend" {
		t.Fatalf("server saw %s", id)
	}
	// Never merged: a certificate claiming an a.example identity but chaining to B's root
	// (minted with B's root key directly) is checked against A's bundle only, and fails.
	csr, _, _ := newCSR(t)
	u := mustIdentity(t, "spiffe://a.example/ns/shop/sa/frontend")
	tmpl := &x509.Certificate{SerialNumber: bigOne(), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		URIs: []*url.URL{{Scheme: "spiffe", Host: string(u.TrustDomain), Path: "/ns/shop/sa/frontend"}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, rootB.Cert, csr.PublicKey, rootB.Key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := setB.VerifyPeer([][]byte{der}); err == nil {
		t.Fatal("b.example's root vouched for an a.example identity")
	}
	// B drops A's bundle: A's workloads are refused.
	setB.Remove("a.example")
	if _, err := mtls(t, server, setB, client, setA); err == nil {
		t.Fatal("mTLS succeeded after the peer bundle was removed")
	}
	setB.Set(gotA)

	// A watches B's bundle; B publishes sequence 2 with a 200 ms refresh hint.
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	go WatchBundle(wctx, setA, "b.example", urlB, FetchOptions{EndpointID: mustIdentity(t, endpointB), Bundles: bootstrap}, nil)
	next, _ := LocalBundle(interB, 2, 200*time.Millisecond)
	setB.Set(next)
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := setA.Get("b.example")
		if seq, _ := b.SequenceNumber(); seq == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the watcher did not pick up sequence 2 within 5 s (refresh hint 200 ms)")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
