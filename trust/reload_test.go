package trust

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestReloadDir: a changed plug-in CA directory is swapped in; a broken one is reported once
// and the CA keeps signing with what it had.
func TestReloadDir(t *testing.T) {
	root, err := NewRoot("cluster.local", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	first, _ := root.NewIntermediate(IntermediateOptions{Cluster: "a"})
	dir := t.TempDir()
	if err := first.WriteDir(dir); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(ServerConfig{Authority: first, Clusters: StaticClients{}, LocalCluster: "a"})
	if err != nil {
		t.Fatal(err)
	}
	// A half-written directory (a key that does not match the certificate), already there
	// when reloading starts: it still counts.
	other, _ := root.NewIntermediate(IntermediateOptions{Cluster: "a"})
	files, _ := other.PluggedFiles()
	os.WriteFile(filepath.Join(dir, CAKeyFile), files[CAKeyFile], 0o600)
	var errs atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go ReloadDir(ctx, srv, dir, 10*time.Millisecond, func(error) { errs.Add(1) })
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	waitFor("the broken directory to be reported", func() bool { return errs.Load() > 0 })
	if srv.authority() != first {
		t.Fatal("a broken directory replaced the CA")
	}
	time.Sleep(50 * time.Millisecond) // several more intervals with the same broken files
	if n := errs.Load(); n != 1 {
		t.Fatalf("the same broken directory was reported %d times; want once", n)
	}

	// The rest of the files arrive: the new CA is swapped in.
	if err := other.WriteDir(dir); err != nil {
		t.Fatal(err)
	}
	waitFor("the new CA", func() bool { return srv.authority().Cert.Equal(other.Cert) })

	// Another trust domain is refused.
	foreign, _ := NewRoot("other.example", RootOptions{})
	fi, _ := foreign.NewIntermediate(IntermediateOptions{Cluster: "a"})
	fi.WriteDir(dir)
	waitFor("the foreign CA to be refused", func() bool { return errs.Load() == 2 })
	if !srv.authority().Cert.Equal(other.Cert) {
		t.Fatal("a CA for another trust domain was swapped in")
	}
}

// TestFetchStatus reads a server's TrustStatus back through its DebugHandler, and refuses
// a page that is not one.
func TestFetchStatus(t *testing.T) {
	root, _ := NewRoot("example.org", RootOptions{})
	srv, err := NewServer(ServerConfig{Authority: root, Clusters: StaticClients{}, LocalCluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/trustz", srv.DebugHandler())
	web := httptest.NewServer(mux)
	defer web.Close()
	ctx := context.Background()
	st, err := FetchStatus(ctx, web.Client(), web.URL+"/debug/trustz")
	if err != nil {
		t.Fatal(err)
	}
	if st.TrustDomain != "example.org" || st.Root != Fingerprint(root.Cert.Raw) || len(st.Anchors) != 1 || !st.SignerNotAfter.Equal(root.Cert.NotAfter) {
		t.Fatalf("status %+v", st)
	}
	if _, err := FetchStatus(ctx, web.Client(), web.URL+"/missing"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("a missing page: %v", err)
	}
}
