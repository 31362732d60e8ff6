package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// rootCATrustDomains returns the trust domains of ROOTCA's SPIFFE validator.
func rootCATrustDomains(t *testing.T, s *tlsv3.Secret) []string {
	t.Helper()
	cfg := &tlsv3.SPIFFECertValidatorConfig{}
	if err := s.GetValidationContext().GetCustomValidatorConfig().GetTypedConfig().UnmarshalTo(cfg); err != nil {
		t.Fatalf("ROOTCA is not a SPIFFE validator: %v", err)
	}
	var out []string
	for _, td := range cfg.TrustDomains {
		out = append(out, td.Name)
	}
	slices.Sort(out)
	return out
}

// TestAgentServesSDS runs `isthmus agent` as a process beside a real primary's CA: it
// serves Envoy's SDS on a Unix socket — the workload's certificate, and ROOTCA as the
// SPIFFE validator with one bundle per trust domain — and pushes a new validation context
// when a peer domain's bundle enters the bundle store, without a restart.
func TestAgentServesSDS(t *testing.T) {
	clusters := kubetest.Start(t, 1)
	bin := buildIsthmus(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	client, _ := clusters[0].Client()
	for _, ns := range []string{"istio-system", "demo"} {
		if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.CoreV1().ServiceAccounts("demo").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "echo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rootDir, caDir := filepath.Join(t.TempDir(), "root"), filepath.Join(t.TempDir(), "ca")
	run(t, bin, "trust", "init-root", "--trust-domain", "east.example", "--out-dir", rootDir)
	if _, stderr, err := run(t, bin, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "c1", "--out-dir", caDir); err != nil {
		t.Fatalf("intermediate: %v\n%s", err, stderr)
	}
	httpAddr, caAddr := freeAddr(t), freeAddr(t)
	startProcess(t, "primary", bin, "primary", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "c1", "--trust-domain", "east.example",
		"--xds-address", freeAddr(t), "--http-address", httpAddr, "--ca-dir", caDir, "--ca-address", caAddr)
	exp := int64(3600)
	tr, err := client.CoreV1().ServiceAccounts("demo").CreateToken(ctx, "echo", &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}, ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600)
	sock := filepath.Join(dir, "sds.sock")
	alog := startProcess(t, "agent", bin, "agent", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "c1", "--ca-address", caAddr,
		"--ca-root", filepath.Join(rootDir, trust.RootCertFile), "--token-file", tokenFile, "--dir", filepath.Join(dir, "certs"), "--sds-socket", sock)
	eventually(t, 60*time.Second, "the agent's SDS socket", func() error { _, err := os.Stat(sock); return err })

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := secretservice.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	names := []string{mesh.SDSIdentitySecret, mesh.SDSRootSecret}
	stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.SecretType, Node: &core.Node{Id: "sidecar~10.0.0.1~p.demo~demo.svc.cluster.local"}, ResourceNames: names})
	// recv returns the next response with secrets, ACKing each.
	recv := func() map[string]*tlsv3.Secret {
		t.Helper()
		for {
			type res struct {
				r   *discovery.DiscoveryResponse
				err error
			}
			ch := make(chan res, 1)
			go func() { r, err := stream.Recv(); ch <- res{r, err} }()
			var got res
			select {
			case got = <-ch:
			case <-time.After(60 * time.Second):
				log, _ := os.ReadFile(alog)
				t.Fatalf("no SDS push within 60 s; agent log:\n%s", tail(string(log), 20))
			}
			if got.err != nil {
				t.Fatal(got.err)
			}
			stream.Send(&discovery.DiscoveryRequest{TypeUrl: resource.SecretType, VersionInfo: got.r.VersionInfo, ResponseNonce: got.r.Nonce, ResourceNames: names})
			if len(got.r.Resources) == 0 {
				continue
			}
			out := map[string]*tlsv3.Secret{}
			for _, a := range got.r.Resources {
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
	secrets := recv()
	for secrets[mesh.SDSRootSecret] == nil || secrets[mesh.SDSIdentitySecret] == nil {
		secrets = recv()
	}
	if got := rootCATrustDomains(t, secrets[mesh.SDSRootSecret]); !slices.Equal(got, []string{"east.example"}) {
		t.Fatalf("ROOTCA trust domains %v, want [east.example]", got)
	}
	// A peer domain's bundle enters the store (the primary's federation would write it):
	// the agent pushes a validation context with both domains, each its own bundle.
	westDir := filepath.Join(t.TempDir(), "west")
	run(t, bin, "trust", "init-root", "--trust-domain", "west.example", "--out-dir", westDir)
	if out, stderr, err := run(t, bin, "trust", "bundle", "add", "--kubeconfig", clusters[0].Kubeconfig, "--trust-domain", "west.example", "--ca-dir", westDir); err != nil {
		t.Fatalf("bundle add: %v\n%s%s", err, out, stderr)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		secrets = recv()
		if s, ok := secrets[mesh.SDSRootSecret]; ok && slices.Equal(rootCATrustDomains(t, s), []string{"east.example", "west.example"}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("ROOTCA never got west.example's bundle")
		}
	}
	if _, err := trust.ParseBundleMap(mustRead(t, filepath.Join(dir, "certs", trust.AgentBundleMapFile))); err != nil {
		t.Fatalf("bundle map: %v", err)
	}
}
