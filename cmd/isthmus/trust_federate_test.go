package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/trust"
)

// TestTrustFederateCommands manages a real cluster's federation relationships through the
// CLI: add, list as JSON, every refusal leaving the ConfigMap untouched, remove (which takes
// the domain's bundle out of the bundle store too).
func TestTrustFederateCommands(t *testing.T) {
	clusters := kubetest.Start(t, 1)
	bin := buildIsthmus(t)
	kc := []string{"--kubeconfig", clusters[0].Kubeconfig}
	federate := func(args ...string) (string, string, error) {
		return run(t, bin, append(append([]string{"trust", "federate"}, args...), kc...)...)
	}
	client, _ := clusters[0].Client()
	ctx := context.Background()
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	westDir := filepath.Join(t.TempDir(), "west")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--trust-domain", "west.example", "--out-dir", westDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	good := []string{"add", "--trust-domain", "west.example", "--endpoint", "https://bundle.west.example:8443/",
		"--endpoint-spiffe-id", "spiffe://west.example/ns/istio-system/sa/isthmus-bundle-endpoint", "--bootstrap-ca-dir", westDir}
	refusals := []struct {
		name, want string
		args       []string
	}{
		{"plain http", "want https://", []string{"add", "--trust-domain", "west.example", "--endpoint", "http://bundle.west.example/", "--profile", "https_web"}},
		{"no bootstrap", "exactly one of --bootstrap-bundle", []string{"add", "--trust-domain", "west.example", "--endpoint", "https://b.west.example/", "--endpoint-spiffe-id", "spiffe://west.example/x"}},
		{"endpoint ID of another domain", "must be in west.example", []string{"add", "--trust-domain", "west.example", "--endpoint", "https://b.west.example/",
			"--endpoint-spiffe-id", "spiffe://other.example/x", "--bootstrap-ca-dir", westDir}},
		{"unknown profile", "want https_spiffe or https_web", []string{"add", "--trust-domain", "west.example", "--endpoint", "https://b.west.example/", "--profile", "ftp"}},
		{"own domain", "own trust domain", append(append([]string{}, good...), "--local-trust-domain", "west.example")},
		{"remove unknown", "no relationship with east.example", []string{"remove", "east.example"}},
	}
	for _, r := range refusals {
		if out, stderr, err := federate(r.args...); err == nil || !strings.Contains(stderr, r.want) {
			t.Errorf("%s: %v, want an error saying %q\n%s%s", r.name, err, r.want, out, stderr)
		}
	}
	if _, err := client.CoreV1().ConfigMaps("istio-system").Get(ctx, trust.FederationConfigMap, metav1.GetOptions{}); err == nil {
		t.Fatal("a refused command created the ConfigMap")
	}
	if out, stderr, err := federate(good...); err != nil || !strings.Contains(out, "federating with west.example") {
		t.Fatalf("add: %v\n%s%s", err, out, stderr)
	}
	out, stderr, err := federate("list", "-o", "json")
	if err != nil {
		t.Fatalf("list: %v\n%s", err, stderr)
	}
	var doc struct {
		Relationships []relationshipView `json:"relationships"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil || len(doc.Relationships) != 1 || doc.Relationships[0].Profile != "https_spiffe" || len(doc.Relationships[0].BootstrapRoots) != 1 {
		t.Fatalf("list -o json: %v\n%s", err, out)
	}
	if out, _, err := federate("list", "-o", "yaml"); err != nil || !strings.Contains(out, "trustDomain: west.example") {
		t.Fatalf("list -o yaml: %v\n%s", err, out)
	}
	// A bundle the primary would have stored for the domain goes with the relationship.
	if _, err := (trust.BundleStore{Client: client, Namespace: "istio-system"}).Update(ctx, func(s *trust.BundleSet) error {
		b, err := trust.ParsePEMBundle("west.example", mustRead(t, filepath.Join(westDir, trust.RootCertFile)))
		if err != nil {
			return err
		}
		return s.Set(b)
	}); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := federate("remove", "west.example"); err != nil || !strings.Contains(out, "its bundle left") {
		t.Fatalf("remove: %v\n%s%s", err, out, stderr)
	}
	set, err := trust.BundleStore{Client: client, Namespace: "istio-system"}.Load(ctx)
	if err != nil || len(set.Domains()) != 0 {
		t.Fatalf("bundle store after remove: %v %v", set.Domains(), err)
	}
	if out, _, _ := federate("list"); strings.Contains(out, "west.example") {
		t.Fatalf("list after remove:\n%s", out)
	}
}
