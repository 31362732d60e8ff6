package istiocrd

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestDefinitionsMatchIstioAPIModule checks that the embedded file is exactly the
// VirtualService, DestinationRule, Gateway, ServiceEntry and Sidecar documents of the istio.io/api module go.mod pins.
func TestDefinitionsMatchIstioAPIModule(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locating istio.io/api: %v", err)
	}
	src, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var want [][]byte
	for _, doc := range bytes.Split(src, []byte("\n---\n")) {
		if bytes.Contains(doc, []byte("\n  name: virtualservices.networking.istio.io\n")) ||
			bytes.Contains(doc, []byte("\n  name: destinationrules.networking.istio.io\n")) ||
			bytes.Contains(doc, []byte("\n  name: serviceentries.networking.istio.io\n")) ||
			bytes.Contains(doc, []byte("\n  name: sidecars.networking.istio.io\n")) ||
			bytes.Contains(doc, []byte("\n  name: gateways.networking.istio.io\n")) {
			want = append(want, doc)
		}
	}
	if got := append(bytes.Join(want, []byte("\n---\n")), '\n'); !bytes.Equal(got, networkingYAML) {
		t.Fatal("networking.gen.yaml differs from istio.io/api's customresourcedefinitions.gen.yaml; refresh it from the module")
	}
	crds, err := Definitions()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range crds {
		if c.Spec.Group == "networking.istio.io" {
			names = append(names, c.Name)
		}
	}
	if strings.Join(names, ",") != "destinationrules.networking.istio.io,gateways.networking.istio.io,serviceentries.networking.istio.io,sidecars.networking.istio.io,virtualservices.networking.istio.io" {
		t.Fatalf("definitions: %v", names)
	}
}

// TestSecurityDefinitionsMatchIstioAPIModule checks that security.gen.yaml is exactly the
// AuthorizationPolicy and PeerAuthentication documents of the pinned istio.io/api module,
// and that Definitions returns them after the networking ones.
func TestSecurityDefinitionsMatchIstioAPIModule(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("locating istio.io/api: %v", err)
	}
	src, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var want [][]byte
	for _, doc := range bytes.Split(src, []byte("\n---\n")) {
		if bytes.Contains(doc, []byte("\n  name: authorizationpolicies.security.istio.io\n")) ||
			bytes.Contains(doc, []byte("\n  name: peerauthentications.security.istio.io\n")) {
			want = append(want, doc)
		}
	}
	if got := append(bytes.Join(want, []byte("\n---\n")), '\n'); !bytes.Equal(got, securityYAML) {
		t.Fatal("security.gen.yaml differs from istio.io/api's customresourcedefinitions.gen.yaml; refresh it from the module")
	}
	crds, err := Definitions()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range crds {
		if c.Spec.Group == "security.istio.io" {
			names = append(names, c.Name)
		}
	}
	if strings.Join(names, ",") != "authorizationpolicies.security.istio.io,peerauthentications.security.istio.io" {
		t.Fatalf("security definitions: %v", names)
	}
}
