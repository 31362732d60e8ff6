package engine

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/internal/uplinkguard"
)

// TestStartRunsPrivilegedContainers starts a real dockerd (Debian's docker.io, which
// .ci/run installs) and runs a privileged container and a privileged exec in it: on a
// machine without CAP_SYS_RESOURCE in the bounding set that works only through the wrapper.
func TestStartRunsPrivilegedContainers(t *testing.T) {
	if testing.Short() {
		t.Skip("starts dockerd")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("dockerd"); err != nil {
		t.Skip("docker.io is not installed (.ci/run installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	if _, err := Start(ctx, Options{Dir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "uplink guard") {
		t.Fatalf("Start without a guard = %v", err)
	}
	g, err := uplinkguard.New()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Start(ctx, Options{Dir: t.TempDir(), Guard: g}); err == nil {
		t.Fatal("Start with a guard not installed succeeded")
	}
	if err := g.Install(); err != nil {
		t.Fatal(err)
	}
	defer g.Remove()

	before := hostSnapshot(t)
	t.Setenv("DOCKER_HOST", "")
	os.Unsetenv("DOCKER_HOST")
	dir := filepath.Join(os.TempDir(), "isthmus-engine-test") // kept between runs: the image cache
	e, err := Start(ctx, Options{Dir: dir, Guard: g, Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Stop()
	has, _ := boundingSetHas(24)
	if e.Started && e.Wrapped == has {
		t.Fatalf("Wrapped=%v with CAP_SYS_RESOURCE in the bounding set=%v", e.Wrapped, has)
	}

	// An image from a tiny static program (the isthmus image's own builder).
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "main.go"), []byte(`package main

import ("fmt"; "os"; "time")

func main() {
	if len(os.Args) > 1 && os.Args[1] == "sleep" { time.Sleep(time.Hour) }
	st, _ := os.ReadFile("/proc/self/status")
	fmt.Printf("hello from a container\n%s", st)
}
`), 0o600)
	os.WriteFile(filepath.Join(src, "go.mod"), []byte("module hello\n\ngo 1.22\n"), 0o600)
	bin := filepath.Join(src, "hello")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir, build.Env = src, append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	b, _ := os.ReadFile(bin)
	img, err := deploy.BuildImage(deploy.ImageConfig{Binary: b, Version: "v0.0.1-enginetest"})
	if err != nil {
		t.Fatal(err)
	}
	var tar bytes.Buffer
	if err := deploy.WriteImageTarball(&tar, img, "isthmus-enginetest:v1"); err != nil {
		t.Fatal(err)
	}
	docker := func(stdin []byte, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, "docker", args...)
		cmd.Env = append(os.Environ(), e.Env())
		if stdin != nil {
			cmd.Stdin = bytes.NewReader(stdin)
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("docker %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	docker(tar.Bytes(), "load")
	out := docker(nil, "run", "--rm", "--privileged", "--network", "none", "--user", "0", "isthmus-enginetest:v1")
	if !strings.Contains(out, "hello from a container") {
		t.Fatalf("privileged run printed %q", out)
	}
	name := "isthmus-enginetest"
	exec.Command("docker", "-H", e.Host, "rm", "-f", name).Run()
	docker(nil, "run", "-d", "--name", name, "--privileged", "--network", "none", "--user", "0", "isthmus-enginetest:v1", "sleep")
	if out := docker(nil, "exec", "--privileged", name, "/isthmus"); !strings.Contains(out, "hello from a container") {
		t.Fatalf("privileged exec printed %q", out)
	}
	if err := g.Check(); err != nil {
		t.Fatalf("with dockerd running: %v", err)
	}
	docker(nil, "rm", "-f", name)
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	if got := hostSnapshot(t); got != before {
		t.Fatalf("the host's forwarding state after Stop differs:\nbefore:\n%s\nafter:\n%s", before, got)
	}
}

// hostSnapshot is what dockerd touches on the host: IPv4 forwarding and the filter and nat
// tables.
func hostSnapshot(t *testing.T) string {
	t.Helper()
	fwd, err := os.ReadFile(ipForwardPath)
	if err != nil {
		t.Fatal(err)
	}
	s := "ip_forward=" + string(fwd)
	for _, table := range []string{"filter", "nat"} {
		out, err := exec.Command("iptables", "-w", "-t", table, "-S").Output()
		if err != nil {
			t.Fatal(err)
		}
		s += string(out)
	}
	return s
}
