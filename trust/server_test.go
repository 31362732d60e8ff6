package trust_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/trust"
)

var env struct {
	cluster *kubelocal.Cluster
	client  kubernetes.Interface
	root    *trust.Authority
	ca      *trust.Authority
	addr    string
	metrics *prometheus.Registry
	server  *trust.Server
}

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, 1, "ca", setup)) }

func setup(clusters []*kubelocal.Cluster) (func(), error) {
	c := clusters[0]
	cs, err := c.Client()
	if err != nil {
		return nil, err
	}
	env.cluster, env.client = c, cs
	if env.root, err = trust.NewRoot("cluster.local", trust.RootOptions{}); err != nil {
		return nil, err
	}
	if env.ca, err = env.root.NewIntermediate(trust.IntermediateOptions{Cluster: "ca-1"}); err != nil {
		return nil, err
	}
	env.metrics = prometheus.NewRegistry()
	srv, err := trust.NewServer(trust.ServerConfig{
		Authority: env.ca, Clusters: trust.StaticClients{"ca-1": cs}, LocalCluster: "ca-1", Metrics: env.metrics,
	})
	if err != nil {
		return nil, err
	}
	env.server = srv
	certs, key, err := env.ca.IssueServing([]string{"istiod.istio-system.svc"}, time.Hour)
	if err != nil {
		return nil, err
	}
	tc, err := tls.X509KeyPair(bytes.Join(certs, nil), pemKey(key))
	if err != nil {
		return nil, err
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{tc}, ClientAuth: tls.RequestClientCert})))
	srv.Register(g)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	env.addr = l.Addr().String()
	go g.Serve(l)
	return g.Stop, nil
}

func pemKey(k *ecdsa.PrivateKey) []byte {
	der, _ := x509.MarshalPKCS8PrivateKey(k)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func needEnv(t testing.TB) {
	t.Helper()
	if env.addr == "" {
		t.Skip("integration test: starts a real Kubernetes cluster; runs without -short")
	}
}

// caClient dials the CA as Istio's agent does: TLS verified against the root, optionally
// presenting a client certificate (renewal).
func caClient(t testing.TB, clientCert *tls.Certificate) pb.IstioCertificateServiceClient {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(env.root.Cert)
	cfg := &tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc"}
	if clientCert != nil {
		cfg.Certificates = []tls.Certificate{*clientCert}
	}
	conn, err := grpc.NewClient(env.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewIstioCertificateServiceClient(conn)
}

func csrPEM(t testing.TB, uri string) ([]byte, *ecdsa.PrivateKey) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{}}
	if uri != "" {
		u, _ := url.Parse(uri)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), key
}

func serviceAccountToken(t testing.TB, ns, sa string, audiences []string, bound *authnv1.BoundObjectReference) string {
	t.Helper()
	ctx := context.Background()
	env.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	env.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	tr, err := env.client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: audiences, BoundObjectRef: bound},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

func withToken(token string, kv ...string) context.Context {
	md := metadata.Pairs(append([]string{"authorization", "Bearer " + token}, kv...)...)
	return metadata.NewOutgoingContext(context.Background(), md)
}

func TestWorkloadGetsItsOwnIdentity(t *testing.T) {
	needEnv(t)
	client := caClient(t, nil)
	token := serviceAccountToken(t, "demo", "echo", []string{trust.Audience}, nil)
	csr, key := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/echo")
	resp, err := client.CreateCertificate(withToken(token), &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.CertChain) != 3 {
		t.Fatalf("chain of %d; want leaf, intermediate, root", len(resp.CertChain))
	}
	var certs []*x509.Certificate
	for _, p := range resp.CertChain {
		b, _ := pem.Decode([]byte(p))
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, c)
	}
	if !certs[2].Equal(env.root.Cert) {
		t.Fatal("the chain does not end with the root")
	}
	roots := x509.NewCertPool()
	roots.AddCert(env.root.Cert)
	inter := x509.NewCertPool()
	inter.AddCert(certs[1])
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatal(err)
	}
	if certs[0].URIs[0].String() != "spiffe://cluster.local/ns/demo/sa/echo" {
		t.Fatalf("leaf identity %v", certs[0].URIs)
	}

	// Renewal: the current certificate authenticates, no token needed.
	cert := tls.Certificate{PrivateKey: key}
	for _, p := range resp.CertChain[:2] {
		b, _ := pem.Decode([]byte(p))
		cert.Certificate = append(cert.Certificate, b.Bytes)
	}
	renewer := caClient(t, &cert)
	csr2, _ := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/echo")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := renewer.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csr2)}); err != nil {
		t.Fatalf("renewal with the current certificate: %v", err)
	}
	csr3, _ := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/admin")
	if _, err := renewer.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csr3)}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("renewal for another identity: %v", err)
	}
}

func TestRefusals(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	client := caClient(t, nil)
	good := serviceAccountToken(t, "demo", "echo", []string{trust.Audience}, nil)
	// A token bound to a Secret that is then deleted stops authenticating.
	env.client.CoreV1().Secrets("demo").Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "binding"}}, metav1.CreateOptions{})
	sec, _ := env.client.CoreV1().Secrets("demo").Get(ctx, "binding", metav1.GetOptions{})
	revoked := serviceAccountToken(t, "demo", "echo", []string{trust.Audience}, &authnv1.BoundObjectReference{Kind: "Secret", APIVersion: "v1", Name: "binding", UID: sec.UID})
	env.client.CoreV1().Secrets("demo").Delete(ctx, "binding", metav1.DeleteOptions{})
	wrongAudience := serviceAccountToken(t, "demo", "echo", nil, nil)
	csrEcho, _ := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/echo")
	csrOther, _ := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/other")
	// A token signed by another key: the shape of a real one, not its signature.
	parts := strings.Split(good, ".")
	forged := parts[0] + "." + parts[1] + ".c2lnbmF0dXJl"
	tests := []struct {
		name string
		ctx  context.Context
		csr  string
		want codes.Code
	}{
		{"another service account's identity", withToken(good), string(csrOther), codes.PermissionDenied},
		{"forged token", withToken(forged), string(csrEcho), codes.Unauthenticated},
		{"revoked token", withToken(revoked), string(csrEcho), codes.Unauthenticated},
		{"token for another audience", withToken(wrongAudience), string(csrEcho), codes.Unauthenticated},
		{"unknown cluster", withToken(good, "clusterid", "nope"), string(csrEcho), codes.Unauthenticated},
		{"malformed cluster ID", withToken(good, "clusterid", "no spaces"), string(csrEcho), codes.Unauthenticated},
		{"no token", metadata.NewOutgoingContext(ctx, metadata.MD{}), string(csrEcho), codes.Unauthenticated},
		{"malformed CSR", withToken(good), "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", codes.InvalidArgument},
		{"not a CSR", withToken(good), "hello", codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := client.CreateCertificate(tt.ctx, &pb.IstioCertificateRequest{Csr: tt.csr})
			if status.Code(err) != tt.want || resp != nil {
				t.Fatalf("got %v (response %v); want %s", err, resp, tt.want)
			}
		})
	}
	if _, err := client.CreateCertificate(withToken(good), &pb.IstioCertificateRequest{Csr: string(csrEcho), ValidityDuration: -5}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("negative validity: %v", err)
	}
	mfs, _ := env.metrics.Gather()
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "isthmus_trust_csr_refused_total" {
			found = true
		}
	}
	if !found {
		t.Fatal("refusals are not counted in isthmus_trust_csr_refused_total")
	}
}

// TestAgentWritesAndRenewsAtHalfLife runs the workload agent against the CA: it writes the
// file_watcher layout and renews at half of the certificate's life.
func TestAgentWritesAndRenewsAtHalfLife(t *testing.T) {
	needEnv(t)
	token := serviceAccountToken(t, "demo", "agent", []string{trust.Audience}, nil)
	dir := t.TempDir()
	agent, err := trust.NewAgent(trust.AgentConfig{
		CA:    caClient(t, nil),
		Token: func() (string, error) { return token, nil },
		Dir:   dir,
		TTL:   4 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitCert := func(not *x509.Certificate) *x509.Certificate {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			if c := agent.Current(); c != nil && (not == nil || c.SerialNumber.Cmp(not.SerialNumber) != 0) {
				return c
			}
			if time.Now().After(deadline) {
				t.Fatal("no (new) certificate within 10 s")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	first := waitCert(nil)
	if first.URIs[0].String() != "spiffe://cluster.local/ns/demo/sa/agent" {
		t.Fatalf("identity %v", first.URIs)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, trust.AgentCertFile), filepath.Join(dir, trust.AgentKeyFile))
	if err != nil {
		t.Fatalf("the files do not form a key pair: %v", err)
	}
	if len(pair.Certificate) != 2 {
		t.Fatalf("cert-chain.pem holds %d certificates; want leaf and intermediate", len(pair.Certificate))
	}
	rootPEM, _ := os.ReadFile(filepath.Join(dir, trust.AgentRootFile))
	if b, _ := pem.Decode(rootPEM); b == nil || !bytes.Equal(b.Bytes, env.root.Cert.Raw) {
		t.Fatal("root-cert.pem is not the mesh root")
	}
	start := time.Now()
	second := waitCert(first)
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("renewed after %s; a 4 s certificate is renewed at about 2 s", d)
	}
	if !second.NotAfter.After(first.NotAfter) {
		t.Fatal("the renewed certificate does not outlive the first")
	}
}
