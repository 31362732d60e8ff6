package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/internal/spirebin"
	"github.com/isthmus-mesh/isthmus/trust"
)

// startProcess runs a process with its output in a log file and stops it (SIGTERM, then
// SIGKILL) when the test ends.
func startProcess(t *testing.T, name string, bin string, args ...string) string {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	logf, _ := os.Create(logPath)
	p := exec.Command(bin, args...)
	p.Stdout, p.Stderr = logf, logf
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- p.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			p.Process.Kill()
			<-done
		}
		logf.Close()
	})
	return logPath
}

// eventually polls check every 200 ms until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestSPIREFederation federates an Isthmus primary with a real SPIRE server (v1.13.3) both
// ways over https_spiffe: SPIRE's federates_with fetches the primary's bundle endpoint and
// lists isthmus.example's bundle; the primary fetches SPIRE's endpoint (added with
// `isthmus trust federate add`) and reports spire.example on trustz, in `isthmus trust
// status` and in its bundle store.
func TestSPIREFederation(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: a real API server and a SPIRE server; runs without -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	spire, err := spirebin.Ensure(ctx, spirebin.Options{Progress: os.Stderr})
	if err != nil {
		t.Fatal(err)
	}
	clusters := kubetest.Start(t, 1)
	bin := buildIsthmus(t)
	client, err := clusters[0].Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	rootDir, caDir := filepath.Join(t.TempDir(), "root"), filepath.Join(t.TempDir(), "ca")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--trust-domain", "isthmus.example", "--out-dir", rootDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "c1", "--out-dir", caDir); err != nil {
		t.Fatalf("intermediate: %v\n%s", err, stderr)
	}
	httpAddr, bundleAddr := freeAddr(t), freeAddr(t)
	plog := startProcess(t, "primary", bin, "primary", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "c1",
		"--trust-domain", "isthmus.example", "--xds-address", freeAddr(t), "--http-address", httpAddr,
		"--ca-dir", caDir, "--ca-address", freeAddr(t), "--bundle-addr", bundleAddr, "--bundle-refresh-hint", "5s")

	// The SPIRE server: sqlite datastore, disk key manager, its own bundle endpoint, and a
	// federation relationship with the primary's endpoint.
	dir := t.TempDir()
	_, spirePort, _ := net.SplitHostPort(freeAddr(t))
	_, fedPort, _ := net.SplitHostPort(freeAddr(t))
	sock := filepath.Join(dir, "api.sock")
	isthmusID := "spiffe://isthmus.example/ns/istio-system/sa/" + trust.EndpointServiceAccount
	conf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%s"
  socket_path = %q
  trust_domain = "spire.example"
  data_dir = %q
  log_level = "DEBUG"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
  federation {
    bundle_endpoint {
      address = "127.0.0.1"
      port = %s
    }
    federates_with "isthmus.example" {
      bundle_endpoint_url = "https://%s/"
      bundle_endpoint_profile "https_spiffe" {
        endpoint_spiffe_id = %q
      }
    }
  }
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  KeyManager "disk" {
    plugin_data {
      keys_path = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
`, spirePort, sock, filepath.Join(dir, "data"), fedPort, bundleAddr, isthmusID, filepath.Join(dir, "datastore.sqlite3"), filepath.Join(dir, "keys.json"))
	confPath := filepath.Join(dir, "server.conf")
	os.WriteFile(confPath, []byte(conf), 0o600)
	slog := startProcess(t, "spire-server", spire, "run", "-config", confPath)
	spireCmd := func(args ...string) (string, error) {
		args = append(args, "-socketPath", sock)
		out, err := exec.CommandContext(ctx, spire, args...).CombinedOutput()
		return string(out), err
	}
	eventually(t, 60*time.Second, "spire-server healthy", func() error {
		out, err := spireCmd("healthcheck")
		if err != nil {
			log, _ := os.ReadFile(slog)
			return fmt.Errorf("%v: %s\n--- log tail:\n%s", err, out, tail(string(log), 20))
		}
		return nil
	})

	// SPIRE learns isthmus.example's bootstrap bundle (to authenticate the endpoint), then
	// fetches it from the primary's bundle endpoint.
	bootstrap := filepath.Join(dir, "isthmus-bootstrap.json")
	b, err := trust.ParsePEMBundle("isthmus.example", mustRead(t, filepath.Join(rootDir, trust.RootCertFile)))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := b.Marshal()
	os.WriteFile(bootstrap, raw, 0o600)
	if out, err := spireCmd("bundle", "set", "-format", "spiffe", "-id", "spiffe://isthmus.example", "-path", bootstrap); err != nil {
		t.Fatalf("spire-server bundle set: %v\n%s", err, out)
	}
	// A second root published in the primary's CA (a rotation's publish phase): the
	// bundle SPIRE holds can only have it from the endpoint.
	next, err := trust.NewRoot("isthmus.example", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rootFile := filepath.Join(caDir, trust.RootCertFile)
	if err := os.WriteFile(rootFile, append(mustRead(t, rootFile), next.RootPEM()...), 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "SPIRE fetched the primary's bundle with both roots", func() error {
		spireCmd("federation", "refresh", "-id", "isthmus.example")
		out, err := spireCmd("bundle", "list", "-format", "spiffe", "-id", "spiffe://isthmus.example")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		fetched, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("isthmus.example"), []byte(out))
		if err != nil {
			return fmt.Errorf("bundle list: %v: %s", err, out)
		}
		if !fetched.HasX509Authority(next.Cert) || !fetched.HasX509Authority(b.X509Authorities()[0]) {
			log, _ := os.ReadFile(slog)
			return fmt.Errorf("SPIRE holds %d root(s) for isthmus.example, not the endpoint's two; spire-server log:\n%s",
				len(fetched.X509Authorities()), grepLines(string(log), "isthmus.example", 8))
		}
		return nil
	})
	t.Log("SPIRE's federates_with fetched isthmus.example's bundle from the primary's endpoint")

	// The other way: the primary fetches SPIRE's bundle endpoint (https_spiffe, SPIRE's
	// server SVID), bootstrapped with `spire-server bundle show`.
	spireBundle, err := spireCmd("bundle", "show", "-format", "spiffe")
	if err != nil {
		t.Fatalf("bundle show: %v\n%s", err, spireBundle)
	}
	sb := filepath.Join(dir, "spire-bundle.json")
	os.WriteFile(sb, []byte(spireBundle), 0o600)
	if out, stderr, err := run(t, bin, "trust", "federate", "add", "--kubeconfig", clusters[0].Kubeconfig, "--trust-domain", "spire.example",
		"--endpoint", "https://127.0.0.1:"+fedPort+"/", "--endpoint-spiffe-id", "spiffe://spire.example/spire/server", "--bootstrap-bundle", sb,
		"--local-trust-domain", "isthmus.example"); err != nil {
		t.Fatalf("trust federate add: %v\n%s%s", err, out, stderr)
	}
	want, _ := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("spire.example"), []byte(spireBundle))
	eventually(t, 30*time.Second, "the primary fetched SPIRE's bundle", func() error {
		resp, err := http.Get("http://" + httpAddr + "/debug/trustz")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var doc trustzDoc
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			return err
		}
		if doc.Federation == nil || len(doc.Federation.Peers) != 1 {
			log, _ := os.ReadFile(plog)
			return fmt.Errorf("trustz: %+v\n%s", doc.Federation, tail(string(log), 10))
		}
		p := doc.Federation.Peers[0]
		if p.TrustDomain != "spire.example" || p.State != "ok" || !p.Stored {
			return fmt.Errorf("peer %+v", p)
		}
		if len(p.Roots) != len(want.X509Authorities()) || p.Roots[0] != trust.Fingerprint(want.X509Authorities()[0].Raw) {
			return fmt.Errorf("peer roots %v, SPIRE's %d", p.Roots, len(want.X509Authorities()))
		}
		return nil
	})
	set, err := trust.BundleStore{Client: client, Namespace: "istio-system"}.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := set.Get("spire.example"); !ok {
		t.Fatalf("spire.example is not in the bundle store: %v", set.Domains())
	}
	out, _, err := run(t, bin, "trust", "status", "--primary", "c1="+httpAddr)
	if err != nil || !strings.Contains(out, "spire.example") || !strings.Contains(out, "ok") {
		t.Fatalf("trust status: %v\n%s", err, out)
	}
	t.Logf("the primary fetched spire.example's bundle from SPIRE's endpoint:\n%s", out)

	// The primary's metrics: its endpoint's sequence went up with the second root, the
	// fetches of SPIRE's bundle are counted.
	metrics := func() string {
		resp, err := http.Get("http://" + httpAddr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b strings.Builder
		_, _ = io.Copy(&b, resp.Body)
		return b.String()
	}
	m := metrics()
	for _, want := range []string{"isthmus_trust_bundle_endpoint_sequence 2", `isthmus_trust_federation_fetches_total{peer="spire.example",result="ok"}`,
		`isthmus_trust_bundle_endpoint_requests_total{code="200"}`, `isthmus_trust_federation_bundle_sequence{peer="spire.example"}`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}

	// A wrong endpoint SPIFFE ID is refused with its reason on trustz and in the metrics;
	// the bundle in force stays in the store.
	if out, stderr, err := run(t, bin, "trust", "federate", "add", "--kubeconfig", clusters[0].Kubeconfig, "--trust-domain", "spire.example",
		"--endpoint", "https://127.0.0.1:"+fedPort+"/", "--endpoint-spiffe-id", "spiffe://spire.example/not/the/server", "--bootstrap-bundle", sb); err != nil {
		t.Fatalf("trust federate add: %v\n%s%s", err, out, stderr)
	}
	eventually(t, 30*time.Second, "the wrong endpoint SPIFFE ID refused", func() error {
		out, _, err := run(t, bin, "trust", "status", "--primary", httpAddr, "-o", "json")
		if err != nil {
			return err
		}
		var docs map[string]trustzDoc
		if err := json.Unmarshal([]byte(out), &docs); err != nil {
			return err
		}
		d := docs[httpAddr]
		if d.Federation == nil || len(d.Federation.Peers) != 1 || d.Federation.Peers[0].LastErrorReason != trust.ReasonEndpointID {
			return fmt.Errorf("status: %s", out)
		}
		t.Logf("refused: %s", d.Federation.Peers[0].LastError)
		return nil
	})
	if !strings.Contains(metrics(), `isthmus_trust_federation_fetches_total{peer="spire.example",result="endpoint_id"}`) {
		t.Error("no endpoint_id refusal in the metrics")
	}
	if set, err := (trust.BundleStore{Client: client, Namespace: "istio-system"}).Load(ctx); err != nil {
		t.Fatal(err)
	} else if _, ok := set.Get("spire.example"); !ok {
		t.Error("the refused fetch took spire.example's bundle out of the store")
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// grepLines returns the last n lines of s that contain sub.
func grepLines(s, sub string, n int) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}
