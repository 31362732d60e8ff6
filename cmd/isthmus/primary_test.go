package main

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/primary"
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

	httpAddr := freeAddr(t)
	logPath := filepath.Join(t.TempDir(), "primary.log")
	logf, _ := os.Create(logPath)
	p := exec.Command(bin, "primary", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "west",
		"--xds-address", freeAddr(t), "--http-address", httpAddr, "--probe-interval", "1s")
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
	if _, stderr, err := run(t, bin, "status", "--primary", freeAddr(t)); err == nil || !strings.Contains(stderr, "is `isthmus primary` running") {
		t.Fatalf("status against nothing: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "primary", "--cluster-id", "bad id"); err == nil || !strings.Contains(stderr, "--cluster-id") {
		t.Fatalf("bad cluster ID: %v\n%s", err, stderr)
	}
}
