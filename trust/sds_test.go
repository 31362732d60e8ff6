package trust_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"net"
	"path/filepath"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// sdsStream opens an SDS stream to the server on a Unix socket, as Envoy does to Istio's
// agent, and asks for both secrets.
func sdsStream(t *testing.T, sds *trust.SDS) secretservice.SecretDiscoveryService_StreamSecretsClient {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "sds.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g := grpc.NewServer()
	sds.Register(ctx, g)
	go g.Serve(l)
	t.Cleanup(func() { cancel(); g.Stop() })
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	stream, err := secretservice.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.SecretType, Node: &core.Node{Id: "sidecar~10.0.0.1~p.demo~demo.svc.cluster.local"},
		ResourceNames: []string{mesh.SDSIdentitySecret, mesh.SDSRootSecret}}); err != nil {
		t.Fatal(err)
	}
	return stream
}

// recvSecrets receives responses, ACKing each, until one carries secrets (go-control-plane
// answers a first request for secrets that do not exist yet with an empty response, which
// Envoy ACKs and keeps waiting), and returns them by name.
func recvSecrets(t *testing.T, stream secretservice.SecretDiscoveryService_StreamSecretsClient) map[string]*tlsv3.Secret {
	t.Helper()
	type result struct {
		r   *discovery.DiscoveryResponse
		err error
	}
	deadline := time.After(15 * time.Second)
	for {
		ch := make(chan result, 1)
		go func() { r, err := stream.Recv(); ch <- result{r, err} }()
		var res result
		select {
		case res = <-ch:
		case <-deadline:
			t.Fatal("no SDS response with secrets within 15 s")
		}
		if res.err != nil {
			t.Fatal(res.err)
		}
		if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.SecretType, VersionInfo: res.r.VersionInfo, ResponseNonce: res.r.Nonce,
			ResourceNames: []string{mesh.SDSIdentitySecret, mesh.SDSRootSecret}}); err != nil {
			t.Fatal(err)
		}
		if len(res.r.Resources) == 0 {
			continue
		}
		out := map[string]*tlsv3.Secret{}
		for _, a := range res.r.Resources {
			s := &tlsv3.Secret{}
			if err := a.UnmarshalTo(s); err != nil {
				t.Fatal(err)
			}
			if err := s.Validate(); err != nil {
				t.Fatalf("secret %s fails Envoy's validation: %v", s.Name, err)
			}
			out[s.Name] = s
		}
		return out
	}
}

func leafOf(t *testing.T, s *tlsv3.Secret) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if b == nil {
		t.Fatalf("secret %s holds no PEM chain", s.Name)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestSDSServesAndPushesRenewals: an Agent with a real service-account token gets its
// certificate from the CA; Envoy's SDS stream receives it and the root, and every renewal
// is pushed without a new request.
func TestSDSServesAndPushesRenewals(t *testing.T) {
	needEnv(t)
	sds := trust.NewSDS(trust.SDSConfig{})
	token := serviceAccountToken(t, "demo", "sds", []string{trust.Audience}, nil)
	agent, err := trust.NewAgent(trust.AgentConfig{CA: caClient(t, nil), Token: func() (string, error) { return token, nil },
		Dir: t.TempDir(), TTL: 4 * time.Second, OnIssue: sds.Update})
	if err != nil {
		t.Fatal(err)
	}
	stream := sdsStream(t, sds) // before the first certificate: the request waits
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx) }()
	defer func() { cancel(); <-done }()

	first := recvSecrets(t, stream)
	if len(first) != 2 {
		t.Fatalf("got secrets %v; want default and ROOTCA", first)
	}
	leaf := leafOf(t, first[mesh.SDSIdentitySecret])
	if leaf.URIs[0].String() != "spiffe://cluster.local/ns/demo/sa/sds" {
		t.Fatalf("identity %v", leaf.URIs)
	}
	if len(first[mesh.SDSIdentitySecret].GetTlsCertificate().GetPrivateKey().GetInlineBytes()) == 0 {
		t.Fatal("no private key in the identity secret")
	}
	rb, _ := pem.Decode(first[mesh.SDSRootSecret].GetValidationContext().GetTrustedCa().GetInlineBytes())
	if rb == nil || string(rb.Bytes) != string(env.root.Cert.Raw) {
		t.Fatal("ROOTCA is not the mesh root")
	}
	second := recvSecrets(t, stream)
	if l2 := leafOf(t, second[mesh.SDSIdentitySecret]); l2.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Fatal("the push after renewal carries the old certificate")
	}
}

// TestSDSMultiTrustValidator: with a bundle set, ROOTCA is Envoy's SPIFFE validator with
// one bundle per trust domain, never one merged pool.
func TestSDSMultiTrustValidator(t *testing.T) {
	set := trust.NewBundleSet()
	var issued trust.Issued
	for _, td := range []string{"east.example", "west.example"} {
		root, err := trust.NewRoot(mustTD(t, td), trust.RootOptions{})
		if err != nil {
			t.Fatal(err)
		}
		b, err := trust.LocalBundle(root, 1, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if err := set.Set(b); err != nil {
			t.Fatal(err)
		}
		if td == "east.example" {
			issued = trust.Issued{ChainPEM: root.RootPEM(), KeyPEM: []byte("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"), RootPEM: root.RootPEM()}
		}
	}
	sds := trust.NewSDS(trust.SDSConfig{Bundles: set})
	stream := sdsStream(t, sds)
	sds.Update(issued)
	got := recvSecrets(t, stream)
	cv := got[mesh.SDSRootSecret].GetValidationContext().GetCustomValidatorConfig()
	if cv.GetName() != "envoy.tls.cert_validator.spiffe" {
		t.Fatalf("ROOTCA validator %q; want Envoy's SPIFFE validator", cv.GetName())
	}
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := cv.GetTypedConfig().UnmarshalTo(cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.TrustDomains) != 2 || cfg.TrustDomains[0].Name != "east.example" || cfg.TrustDomains[1].Name != "west.example" {
		t.Fatalf("trust domains %v", cfg.TrustDomains)
	}

	// A peer domain removed from the set disappears from the validator on refresh.
	set.Remove("west.example")
	if err := sds.RefreshBundles(); err != nil {
		t.Fatal(err)
	}
	got = recvSecrets(t, stream)
	cv = got[mesh.SDSRootSecret].GetValidationContext().GetCustomValidatorConfig()
	cv.GetTypedConfig().UnmarshalTo(cfg)
	if len(cfg.TrustDomains) != 1 {
		t.Fatalf("after removing west.example: %v", cfg.TrustDomains)
	}
}

func mustTD(t *testing.T, s string) mesh.TrustDomain {
	t.Helper()
	td, err := mesh.ParseTrustDomain(s)
	if err != nil {
		t.Fatal(err)
	}
	return td
}
