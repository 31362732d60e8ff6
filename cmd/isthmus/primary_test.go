package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestPrimaryAndStatusCommands runs `isthmus primary` as a process against two real
// clusters linked with `isthmus remote-secret create`, and reads it with `isthmus status`.
func TestPrimaryAndStatusCommands(t *testing.T) {
	clusters := kubetest.Start(t, 2)
	bin := buildIsthmus(t)
	ctx := context.Background()
	local, err := clusters[0].Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := local.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := run(t, bin, "remote-secret", "create", "--kubeconfig", clusters[1].Kubeconfig, "--name", "east")
	if err != nil {
		t.Fatalf("remote-secret create: %v\n%s", err, stderr)
	}
	var secret corev1.Secret
	if err := yaml.Unmarshal([]byte(stdout), &secret); err != nil {
		t.Fatal(err)
	}
	if _, err := local.CoreV1().Secrets("istio-system").Create(ctx, &secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// A root and this cluster's intermediate, made with the CLI.
	caDir := filepath.Join(t.TempDir(), "ca")
	rootDir := filepath.Join(t.TempDir(), "root")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--out-dir", rootDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "west", "--out-dir", caDir); err != nil {
		t.Fatalf("intermediate: %v\n%s", err, stderr)
	}

	httpAddr, caAddr := freeAddr(t), freeAddr(t)
	logPath := filepath.Join(t.TempDir(), "primary.log")
	logf, _ := os.Create(logPath)
	p := exec.Command(bin, "primary", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "west",
		"--xds-address", freeAddr(t), "--http-address", httpAddr, "--probe-interval", "1s",
		"--ca-dir", caDir, "--ca-address", caAddr)
	p.Stdout, p.Stderr = logf, logf
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		p.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- p.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				log, _ := os.ReadFile(logPath)
				t.Errorf("primary did not exit cleanly on SIGTERM: %v\n%s", err, log)
			}
		case <-time.After(15 * time.Second):
			p.Process.Kill()
			t.Error("primary did not stop within 15 s of SIGTERM")
		}
	}()

	var cz primary.ClusterzResponse
	deadline := time.Now().Add(30 * time.Second)
	for {
		stdout, stderr, err = run(t, bin, "status", "--primary", httpAddr, "-o", "json")
		if err == nil {
			if jerr := json.Unmarshal([]byte(stdout), &cz); jerr == nil && cz.Ready && len(cz.Clusters) == 2 &&
				cz.Clusters[0].State == primary.StateSynced && cz.Clusters[1].State == primary.StateSynced {
				break
			}
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logPath)
			t.Fatalf("primary never reported both clusters synced: %v\n%s%s\n--- primary log:\n%s", err, stdout, stderr, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if cz.Clusters[0].ID != "east" || cz.Clusters[1].ID != "west" || cz.Clusters[1].Source != "local" {
		t.Fatalf("clusters: %+v", cz.Clusters)
	}
	stdout, _, err = run(t, bin, "status", "--primary", httpAddr)
	if err != nil || !strings.Contains(stdout, "secret istio-system/istio-remote-secret-east") || !strings.Contains(stdout, "ready;") {
		t.Fatalf("status table: %v\n%s", err, stdout)
	}
	// The CA authenticates a workload of the remote cluster "east" in east itself, through
	// the primary's link, and issues its identity.
	east, _ := clusters[1].Client()
	if _, err := east.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "echo"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tr, err := east.CoreV1().ServiceAccounts("default").CreateToken(ctx, "echo", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	root, err := trust.LoadDir(rootDir)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(root.Cert)
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	cctx := metadata.NewOutgoingContext(ctx, metadata.Pairs("authorization", "Bearer "+tr.Status.Token, "clusterid", "east"))
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(cctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))})
	if err != nil {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("CSR from a remote cluster's workload: %v\n%s", err, log)
	}
	leafBlock, _ := pem.Decode([]byte(resp.CertChain[0]))
	leaf, _ := x509.ParseCertificate(leafBlock.Bytes)
	if leaf.URIs[0].String() != "spiffe://cluster.local/ns/default/sa/echo" {
		t.Fatalf("issued %v", leaf.URIs)
	}

	// A root rotation under the running primary: it reloads its CA directory, and each
	// phase is confirmed on its /debug/trustz.
	state := filepath.Join(t.TempDir(), "rotation.json")
	if _, stderr, err := run(t, bin, "trust", "rotate", "--ca-dir", "west="+caDir, "--state", state); err == nil || !strings.Contains(stderr, "no --primary west=HOST:PORT") {
		t.Fatalf("rotate without a primary to confirm on: %v\n%s", err, stderr)
	}
	stdout, stderr, err = run(t, bin, "trust", "rotate", "--ca-dir", "west="+caDir, "--primary", "west="+httpAddr, "--state", state,
		"--publish", "1s", "--reissue", "1s", "--check-timeout", "30s")
	if err != nil || !strings.Contains(stdout, "done: every CA signs under the new root") {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("trust rotate: %v\n%s%s\n--- primary log:\n%s", err, stdout, stderr, log)
	}
	var tz trust.TrustStatus
	hresp, err := http.Get("http://" + httpAddr + "/debug/trustz")
	if err != nil {
		t.Fatal(err)
	}
	json.NewDecoder(hresp.Body).Decode(&tz)
	hresp.Body.Close()
	if len(tz.Anchors) != 1 || tz.Root == trust.Fingerprint(root.Cert.Raw) || tz.Anchors[0] != tz.Root {
		t.Fatalf("after the rotation the primary serves %+v", tz)
	}

	if _, stderr, err := run(t, bin, "status", "--primary", freeAddr(t)); err == nil || !strings.Contains(stderr, "is `isthmus primary` running") {
		t.Fatalf("status against nothing: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "primary", "--cluster-id", "bad id"); err == nil || !strings.Contains(stderr, "--cluster-id") {
		t.Fatalf("bad cluster ID: %v\n%s", err, stderr)
	}
}
