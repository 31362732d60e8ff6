package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/remote"
)

// buildIsthmus compiles the real binary: `cluster up` re-executes it as the detached node
// agent, so the test must run it as users do, at the process boundary.
func buildIsthmus(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "isthmus")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func run(t *testing.T, bin string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// processesMentioning returns the PIDs of live processes whose command line contains s.
func processesMentioning(s string) []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(s)) {
			continue
		}
		stat, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
			continue
		}
		pids = append(pids, e.Name())
	}
	return pids
}

func TestClusterUpListDown(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
	set, err := kubetest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	bin := buildIsthmus(t)
	state := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { run(t, bin, "cluster", "down", "--state-dir", state) })

	stdout, stderr, err := run(t, bin, "cluster", "up", "--clusters", "2", "--state-dir", state, "-o", "json")
	if err != nil {
		t.Fatalf("cluster up: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, "2 cluster(s) ready") {
		t.Errorf("no progress summary on stderr:\n%s", stderr)
	}
	var up struct{ Clusters []clusterInfo }
	if err := json.Unmarshal([]byte(stdout), &up); err != nil {
		t.Fatalf("cluster up -o json: %v\n%s", err, stdout)
	}
	if len(up.Clusters) != 2 {
		t.Fatalf("want 2 clusters, got %+v", up.Clusters)
	}
	kubectl := func(kubeconfig string, args ...string) string {
		t.Helper()
		out, err := exec.Command(set.Kubectl, append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	for _, c := range up.Clusters {
		if c.Status != "Running" {
			t.Errorf("%s: status %s", c.Name, c.Status)
		}
		if out := kubectl(c.Kubeconfig, "get", "ns"); !strings.Contains(out, "kube-system") {
			t.Errorf("%s: kubectl get ns:\n%s", c.Name, out)
		}
		// Istio's CRDs are installed, so users' Istio YAML applies as on a real cluster.
		kubectl(c.Kubeconfig, "get", "crd", "virtualservices.networking.istio.io", "destinationrules.networking.istio.io")
	}
	// The detached node agent keeps working after `up` has returned.
	kc := up.Clusters[1].Kubeconfig
	kubectl(kc, "run", "echo", "--image=isthmus/echo", "--restart=Never")
	deadline := time.Now().Add(30 * time.Second)
	for {
		ip := kubectl(kc, "get", "pod", "echo", "-o", "jsonpath={.status.podIP}")
		if ip != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pod never got an IP from the detached node agent")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// remote-secret create against a running local cluster gives a secret a primary accepts.
	stdout, stderr, err = run(t, bin, "remote-secret", "create", "--kubeconfig", kc, "--name", "cluster-2", "-o", "json")
	if err != nil {
		t.Fatalf("remote-secret create: %v\n%s", err, stderr)
	}
	var secret corev1.Secret
	if err := json.Unmarshal([]byte(stdout), &secret); err != nil {
		t.Fatalf("remote-secret create -o json: %v\n%s", err, stdout)
	}
	creds, err := remote.ParseSecret(&secret, remote.Policy{})
	if err != nil || len(creds) != 1 || creds[0].Err != nil || creds[0].Cluster != "cluster-2" {
		t.Fatalf("secret from the CLI: %v %+v", err, creds)
	}
	if !strings.Contains(stderr, "token valid until") {
		t.Errorf("remote-secret create did not report the token expiry:\n%s", stderr)
	}

	stdout, _, err = run(t, bin, "cluster", "list", "--state-dir", state, "-o", "yaml")
	if err != nil || strings.Count(stdout, "status: Running") != 2 {
		t.Fatalf("cluster list -o yaml: %v\n%s", err, stdout)
	}
	stdout, _, err = run(t, bin, "cluster", "list", "--state-dir", state)
	if err != nil || !strings.Contains(stdout, "KUBECONFIG") || !strings.Contains(stdout, up.Clusters[0].URL) {
		t.Fatalf("cluster list: %v\n%s", err, stdout)
	}

	if _, stderr, err := run(t, bin, "cluster", "down", "nope", "--state-dir", state); err == nil || !strings.Contains(stderr, `no local cluster named "nope"`) {
		t.Fatalf("down of an unknown cluster: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "cluster", "list", "-o", "xml", "--state-dir", state); err == nil || !strings.Contains(stderr, "-o json") {
		t.Fatalf("unknown output format: %v\n%s", err, stderr)
	}

	stdout, stderr, err = run(t, bin, "cluster", "down", "--state-dir", state)
	if err != nil {
		t.Fatalf("cluster down: %v\n%s", err, stderr)
	}
	if strings.Count(stdout, "stopped and removed") != 2 {
		t.Fatalf("cluster down output:\n%s", stdout)
	}
	if pids := processesMentioning(state); len(pids) > 0 {
		t.Fatalf("processes left after down: %v", pids)
	}
	for _, c := range up.Clusters {
		if _, err := os.Stat(filepath.Dir(c.Kubeconfig)); !os.IsNotExist(err) {
			t.Errorf("%s: data dir left after down", c.Name)
		}
		u, _ := url.Parse(c.URL)
		l, err := net.Listen("tcp", u.Host)
		if err != nil {
			t.Errorf("%s: API server port still taken after down: %v", c.Name, err)
		} else {
			l.Close()
		}
	}
}
