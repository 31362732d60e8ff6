package trust_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// BenchmarkAuthenticate is the cost of authenticating one secure xDS stream: a token
// whose review is cached, a token reviewed by the real API server every time, and a
// client certificate verified against the anchors.
func BenchmarkAuthenticate(b *testing.B) {
	needEnv(b)
	ctx := context.Background()
	env.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench-auth"}}, metav1.CreateOptions{})
	env.client.CoreV1().ServiceAccounts("bench-auth").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "echo"}}, metav1.CreateOptions{})
	tr, err := env.client.CoreV1().ServiceAccounts("bench-auth").CreateToken(ctx, "echo", &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	tokenCtx := metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tr.Status.Token))
	uncached, err := trust.NewServer(trust.ServerConfig{Authority: env.ca, Clusters: trust.StaticClients{"ca-1": env.client},
		LocalCluster: "ca-1", ReviewCacheTTL: time.Nanosecond, Metrics: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	csr, _ := x509.ParseCertificateRequest(der)
	chain, err := env.ca.Sign(ctx, csr, mesh.Identity{TrustDomain: "cluster.local", Namespace: "bench-auth", ServiceAccount: "echo"}, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	var certs []*x509.Certificate
	for _, c := range chain[:len(chain)-1] {
		blk, _ := pem.Decode([]byte(c))
		cert, _ := x509.ParseCertificate(blk.Bytes)
		certs = append(certs, cert)
	}
	certCtx := peer.NewContext(ctx, &peer.Peer{Addr: &net.TCPAddr{}, AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: certs}}})
	for _, bc := range []struct {
		name string
		s    *trust.Server
		ctx  context.Context
	}{{"token-cached", env.server, tokenCtx}, {"token-reviewed", uncached, tokenCtx}, {"certificate", env.server, certCtx}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				if _, _, err := bc.s.Authenticate(bc.ctx, "ca-1"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
