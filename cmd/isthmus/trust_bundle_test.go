package main

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/trust"
)

// TestTrustBundleCommands manages a real cluster's bundle store through the CLI: add from
// a CA directory and from a peer's bundle endpoint, show as JSON, alias, and every refusal
// leaving the store untouched.
func TestTrustBundleCommands(t *testing.T) {
	clusters := kubetest.Start(t, 1)
	bin := buildIsthmus(t)
	kc := []string{"--kubeconfig", clusters[0].Kubeconfig}
	bundle := func(args ...string) (string, string, error) {
		return run(t, bin, append(append([]string{"trust", "bundle"}, args...), kc...)...)
	}
	if _, stderr, err := bundle("show"); err != nil {
		t.Fatalf("show on an empty store: %v\n%s", err, stderr)
	}
	dir := t.TempDir()
	eastDir := filepath.Join(dir, "east")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--trust-domain", "east.example", "--out-dir", eastDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	if _, stderr, err := bundle("add", "--trust-domain", "east.example", "--ca-dir", eastDir); err == nil || !strings.Contains(stderr, "create the namespace") {
		t.Fatalf("add without the control-plane namespace: %v\n%s", err, stderr)
	}
	client, _ := clusters[0].Client()
	if _, err := client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := bundle("add", "--trust-domain", "east.example", "--ca-dir", eastDir); err != nil || !strings.Contains(out, "bundle of east.example stored (1 root(s))") {
		t.Fatalf("add --ca-dir: %v\n%s%s", err, out, stderr)
	}

	// A peer's bundle endpoint (https_web), its TLS certificate from a CA given by file.
	west, err := trust.NewRoot("west.example", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	set := trust.NewBundleSet()
	wb, _ := trust.LocalBundle(west, 7, time.Minute)
	set.Set(wb)
	srv := httptest.NewTLSServer(trust.BundleHandler(set, "west.example"))
	defer srv.Close()
	caFile := filepath.Join(dir, "web-ca.pem")
	os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644)
	if out, stderr, err := bundle("add", "--trust-domain", "west.example", "--endpoint", srv.URL, "--endpoint-ca", caFile); err != nil {
		t.Fatalf("add --endpoint: %v\n%s%s", err, out, stderr)
	}
	if _, stderr, err := bundle("alias", "old.example", "west.example"); err != nil {
		t.Fatalf("alias: %v\n%s", err, stderr)
	}

	out, stderr, err := bundle("show", "-o", "json")
	if err != nil {
		t.Fatalf("show: %v\n%s", err, stderr)
	}
	var v bundlesView
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatal(err)
	}
	if len(v.Bundles) != 2 || v.Bundles[1].TrustDomain != "west.example" || v.Bundles[1].Sequence != 7 ||
		v.Bundles[1].Roots[0] != trust.Fingerprint(west.Cert.Raw) || v.Aliases["old.example"] != "west.example" {
		t.Fatalf("show -o json: %s", out)
	}

	before, _, _ := bundle("show", "-o", "json")
	for _, bad := range [][]string{
		{"add", "--trust-domain", "x.example", "--ca-dir", eastDir, "--pem", caFile}, // two sources
		{"add", "--trust-domain", "x.example", "--pem", filepath.Join(dir, "missing.pem")},
		{"add", "--trust-domain", "x.example", "--pem", filepath.Join(eastDir, trust.CAKeyFile)}, // no certificate
		{"add", "--trust-domain", "Bad_Domain", "--ca-dir", eastDir},
		{"add", "--trust-domain", "old.example", "--ca-dir", eastDir}, // an alias already
		{"alias", "new.example", "missing.example"},
		{"remove", "west.example"}, // the target of an alias
		{"remove", "nowhere.example"},
	} {
		if _, stderr, err := bundle(bad...); err == nil {
			t.Errorf("%v: accepted", bad)
		} else if strings.Contains(stderr, "panic") {
			t.Errorf("%v: %s", bad, stderr)
		}
	}
	if after, _, _ := bundle("show", "-o", "json"); after != before {
		t.Fatalf("a refused command changed the store:\n%s\n%s", before, after)
	}

	for _, td := range []string{"old.example", "west.example"} {
		if _, stderr, err := bundle("remove", td); err != nil {
			t.Fatalf("remove %s: %v\n%s", td, err, stderr)
		}
	}
	if out, _, _ := bundle("show"); !strings.Contains(out, "east.example") || strings.Contains(out, "west.example") {
		t.Fatalf("after removals:\n%s", out)
	}
}
