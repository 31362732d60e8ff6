package trust_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/trust"
)

// Reproduce with:
//
//	go test ./trust -run '^$' -bench CSR -count 5
//
// "grpc": a CSR through the real path (TLS gRPC, token authentication with the
// TokenReview cached, CSR parsing and checks, signing, PEM chain) on one connection.
// "handler": the same server method called in-process, without gRPC and TLS (client and
// server share the 2 cores in "grpc", so it also pays for the client).
// "raw": x509.CreateCertificate alone with the same key types and intermediate, the floor.
// The ratio raw/grpc time is the share of the path that is signing itself.

func BenchmarkCSR(b *testing.B) {
	needEnv(b)
	csr, _ := csrPEM(b, "spiffe://cluster.local/ns/demo/sa/echo")
	b.Run("grpc", func(b *testing.B) {
		client := caClient(b, nil)
		token := serviceAccountToken(b, "demo", "echo", []string{trust.Audience}, nil)
		ctx := withToken(token)
		req := &pb.IstioCertificateRequest{Csr: string(csr)}
		var lat []time.Duration
		for b.Loop() {
			start := time.Now()
			if _, err := client.CreateCertificate(ctx, req); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(start))
		}
		slices.Sort(lat)
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "us-p99")
	})
	b.Run("handler", func(b *testing.B) {
		token := serviceAccountToken(b, "demo", "echo", []string{trust.Audience}, nil)
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+token))
		req := &pb.IstioCertificateRequest{Csr: string(csr)}
		for b.Loop() {
			if _, err := env.server.CreateCertificate(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("raw", func(b *testing.B) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		u, _ := url.Parse("spiffe://cluster.local/ns/demo/sa/echo")
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
		for b.Loop() {
			if _, err := x509.CreateCertificate(rand.Reader, tmpl, env.ca.Cert, key.Public(), env.ca.Key); err != nil {
				b.Fatal(err)
			}
		}
	})
}
