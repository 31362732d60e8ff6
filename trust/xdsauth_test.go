package trust

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// clientLeaf is a client certificate of spiffe://cluster.local/ns/demo/sa/echo signed by
// ca, valid from notBefore to notAfter.
func clientLeaf(t *testing.T, ca *Authority, notBefore, notAfter time.Time) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://cluster.local/ns/demo/sa/echo")
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: notBefore, NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, URIs: []*url.URL{u},
	}, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	chain := [][]byte{der}
	for _, c := range append([]*x509.Certificate{ca.Cert}, ca.Chain...) {
		if c != ca.Root {
			chain = append(chain, c.Raw)
		}
	}
	return &tls.Certificate{Certificate: chain, PrivateKey: key}
}

// caPort serves gRPC health on a loopback listener as the primary's CA port does: TLS
// with client certificates requested and verified when given, and every call
// authenticated from the connection's certificate (as the primary does per xDS stream).
func caPort(t *testing.T, srv *Server, ca *Authority) string {
	t.Helper()
	serving, err := ca.ServingCertificate([]string{"istiod.istio-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	authn := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if _, _, err := srv.Authenticate(ctx, "c1"); err != nil {
			return nil, err
		}
		return h(ctx, req)
	}
	g := grpc.NewServer(grpc.UnaryInterceptor(authn), grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serving},
		ClientAuth: tls.RequestClientCert, VerifyPeerCertificate: srv.VerifyClientCertificate, MinVersion: tls.VersionTLS12})))
	healthpb.RegisterHealthServer(g, health.NewServer())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	return ln.Addr().String()
}

// TestStreamsOnAConnectionOutliveItsCertificate: a connection opened with a valid
// certificate serves new calls after the certificate expires (grpc-go's per-target xDS
// clients open new streams on one shared connection; they were refused once its
// certificate had expired, for as long as the connection lived) — but not once its root
// has been retired.
func TestStreamsOnAConnectionOutliveItsCertificate(t *testing.T) {
	root, _ := NewRoot("cluster.local", RootOptions{})
	inter, _ := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	srv, err := NewServer(ServerConfig{Authority: inter, Clusters: StaticClients{}, LocalCluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	addr := caPort(t, srv, inter)
	now := time.Now()
	leaf := clientLeaf(t, inter, now.Add(-time.Minute), now.Add(2*time.Second))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: inter.AnchorPool(), ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*leaf},
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	check := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := check(); err != nil {
		t.Fatalf("with a valid certificate: %v", err)
	}
	parsed, _ := x509.ParseCertificate(leaf.Certificate[0])
	for !time.Now().After(parsed.NotAfter) {
		time.Sleep(50 * time.Millisecond)
	}
	if err := check(); err != nil {
		t.Fatalf("a new call on the connection after its certificate expired: %v", err)
	}
	// The root is retired: the connection's certificate no longer chains to an anchor.
	newRoot, _ := NewRoot("cluster.local", RootOptions{})
	newInter, _ := newRoot.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	if err := srv.SetAuthority(newInter); err != nil {
		t.Fatal(err)
	}
	if err := check(); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a call on a connection whose root was retired: %v; want Unauthenticated", err)
	}
}

// TestExpiredClientCertificateDoesNotPinTheConnection reproduces a stuck workload: its
// certificate expired while its primary was away, and its first connection to the
// restarted primary presented the expired one. Every call is authenticated per call from
// the connection's certificate (as the primary does per xDS stream), so on a connection
// that stays up the workload was refused forever, though its agent had renewed by then.
// With VerifyClientCertificate the expired certificate fails the handshake, and the same
// gRPC channel connects again with the renewed one and is served.
func TestExpiredClientCertificateDoesNotPinTheConnection(t *testing.T) {
	root, err := NewRoot("cluster.local", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(ServerConfig{Authority: inter, Clusters: StaticClients{}, LocalCluster: "c1", Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	addr := caPort(t, srv, inter)

	now := time.Now()
	var current atomic.Pointer[tls.Certificate] // what the workload's files hold
	current.Store(clientLeaf(t, inter, now.Add(-time.Hour), now.Add(-time.Minute)))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: inter.AnchorPool(), ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return current.Load(), nil },
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	check := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := check(); err == nil {
		t.Fatal("a call with an expired client certificate was served")
	}
	if n := testutil.ToFloat64(srv.certRefused); n < 1 {
		t.Errorf("isthmus_trust_client_certificates_refused_total = %v after an expired certificate; want ≥ 1", n)
	}

	// The agent renews; the same channel must get through on its next connection.
	current.Store(clientLeaf(t, inter, now.Add(-time.Minute), now.Add(time.Hour)))
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := check()
		if err == nil {
			break
		}
		if status.Code(err) == codes.Unauthenticated {
			t.Fatalf("refused on a connection still carrying the expired certificate: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the channel never got through with the renewed certificate: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestVerifyClientCertificate: no certificate passes (a token may follow); a valid chain
// passes; an expired one, one of a foreign root and garbage fail.
func TestVerifyClientCertificate(t *testing.T) {
	root, _ := NewRoot("cluster.local", RootOptions{})
	inter, _ := root.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	foreignRoot, _ := NewRoot("cluster.local", RootOptions{})
	foreign, _ := foreignRoot.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	srv, err := NewServer(ServerConfig{Authority: inter, Clusters: StaticClients{}, LocalCluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, tc := range []struct {
		name string
		raw  [][]byte
		ok   bool
	}{
		{"none", nil, true},
		{"valid", clientLeaf(t, inter, now.Add(-time.Minute), now.Add(time.Hour)).Certificate, true},
		{"expired", clientLeaf(t, inter, now.Add(-time.Hour), now.Add(-time.Second)).Certificate, false},
		{"not yet valid", clientLeaf(t, inter, now.Add(time.Hour), now.Add(2*time.Hour)).Certificate, false},
		{"foreign root", clientLeaf(t, foreign, now.Add(-time.Minute), now.Add(time.Hour)).Certificate, false},
		{"garbage", [][]byte{[]byte("not DER")}, false},
	} {
		err := srv.VerifyClientCertificate(tc.raw, nil)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
