package scenarios

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFakeComponent is not a test: run by TestPortTakenIsRetried as a component process,
// it fails its first start the way a lost port race does, and serves /readyz on the next.
func TestFakeComponent(t *testing.T) {
	marker := os.Getenv("ISTHMUS_FAKE_COMPONENT")
	if marker == "" {
		t.Skip("helper process for TestPortTakenIsRetried")
	}
	addr := os.Args[len(os.Args)-1]
	if _, err := os.Stat(marker); err != nil {
		os.WriteFile(marker, []byte(addr), 0o644)
		fmt.Printf("listen tcp %s: bind: address already in use\n", addr)
		os.Exit(1)
	}
	http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) }))
	os.Exit(0)
}

// TestPortTakenIsRetried: a component that loses the race for its picked port is started
// again with new ports instead of failing the run.
func TestPortTakenIsRetried(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "first-attempt")
	t.Setenv("ISTHMUS_FAKE_COMPONENT", marker)
	e := &localEnv{p: &Local{Binary: os.Args[0]}, dir: t.TempDir()}
	defer e.Close()
	comp, err := e.run(context.Background(), 1, func(ports []int) (*Component, []string) {
		addr := hostPort(ports[0])
		return &Component{Kind: "fake", Name: "fake", Addresses: map[string]string{"http": addr}},
			[]string{"-test.run=^TestFakeComponent$", addr}
	})
	if err != nil {
		t.Fatalf("not retried: %v", err)
	}
	first, _ := os.ReadFile(marker)
	if len(first) == 0 || strings.TrimSpace(string(first)) == comp.Addresses["http"] {
		t.Fatalf("first attempt on %q, success on %q: want a second attempt on new ports", first, comp.Addresses["http"])
	}
}
