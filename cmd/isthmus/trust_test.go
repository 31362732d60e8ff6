package main

import (
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/trust"
)

func runRoot(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := newRootCommand()
	var stdout, stderr strings.Builder
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return stdout.String(), stderr.String(), err
}

func TestTrustInitRootAndIntermediate(t *testing.T) {
	dir := t.TempDir()
	rootDir := filepath.Join(dir, "root")
	if _, _, err := runRoot(t, "trust", "init-root", "--trust-domain", "example.org", "--out-dir", rootDir); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runRoot(t, "trust", "init-root", "--out-dir", rootDir); err == nil || !strings.Contains(err.Error(), "refusing to overwrite") {
		t.Fatalf("overwriting a root: %v", err)
	}
	out, _, err := runRoot(t, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "east", "-o", "yaml")
	if err != nil {
		t.Fatal(err)
	}
	var secret corev1.Secret
	if err := yaml.Unmarshal([]byte(out), &secret); err != nil {
		t.Fatal(err)
	}
	if secret.Name != "cacerts" || secret.Namespace != "istio-system" {
		t.Fatalf("secret %s/%s", secret.Namespace, secret.Name)
	}
	inter, err := trust.ParsePlugged(secret.Data)
	if err != nil {
		t.Fatal(err)
	}
	if inter.TrustDomain != "example.org" || inter.Cert.PermittedURIDomains[0] != "example.org" {
		t.Fatalf("intermediate not bound to the trust domain: %v", inter.Cert.PermittedURIDomains)
	}
	westDir := filepath.Join(dir, "west")
	if _, _, err := runRoot(t, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "west", "--out-dir", westDir); err != nil {
		t.Fatal(err)
	}
	if _, err := trust.LoadDir(westDir); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]string{
		{"trust", "intermediate", "--root-dir", filepath.Join(dir, "missing"), "--cluster", "x", "-o", "yaml"},
		{"trust", "intermediate", "--root-dir", rootDir, "--cluster", "not valid", "-o", "yaml"},
		{"trust", "intermediate", "--root-dir", rootDir, "--cluster", "x"},
		{"trust", "init-root", "--trust-domain", "Bad.Domain", "--out-dir", filepath.Join(dir, "r2")},
	} {
		if _, _, err := runRoot(t, bad...); err == nil {
			t.Errorf("%v: accepted", bad)
		}
	}
}
