package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/uplinkguard"
)

// Options say how to find or start an engine.
type Options struct {
	// Dir holds a started engine's data (images, containers); it survives Stop so that
	// loaded images are reused. Required unless Docker is already running.
	Dir string
	// Install lets Start install Debian's docker.io (apt-get) when dockerd is missing.
	Install bool
	// Guard must pass its check before an engine is started (network safety). Required.
	Guard *uplinkguard.Guard
	// Progress receives one line per step; nil discards them.
	Progress func(string)
}

// Engine is a Docker daemon that answers on Host.
type Engine struct {
	// Host is the DOCKER_HOST value that reaches the daemon ("unix:///…").
	Host string
	// Started is true when Start started the daemon (and Stop will stop it).
	Started bool
	// Wrapped is true when the daemon's default runtime is the CAP_SYS_RESOURCE wrapper.
	Wrapped bool

	cmd     *exec.Cmd
	host    *hostState // the host before dockerd started, restored by Stop
	wrapper string
	done    chan struct{}
	log     string
}

// runRoot is where a started engine's socket, pid file and runtime state live: short (unix
// socket paths are limited) and on tmpfs, so that a reboot leaves nothing stale.
const runRoot = "/run/isthmus-docker"

// Start returns a running engine: the one DOCKER_HOST or /var/run/docker.sock names when
// it answers, otherwise a dockerd it starts. Everything it starts is stopped again when it
// fails.
func Start(ctx context.Context, o Options) (*Engine, error) {
	say := o.Progress
	if say == nil {
		say = func(string) {}
	}
	if o.Guard == nil {
		return nil, errors.New("engine: no uplink guard: an engine is not started before forwarded traffic is kept from leaving the machine")
	}
	if err := o.Guard.Check(); err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	if h := os.Getenv("DOCKER_HOST"); h != "" {
		if err := ping(ctx, h); err != nil {
			return nil, fmt.Errorf("engine: DOCKER_HOST=%s does not answer (%v); unset it to let isthmus start its own engine", h, err)
		}
		say("container engine: using DOCKER_HOST=" + h)
		return &Engine{Host: h}, nil
	}
	if ping(ctx, "unix:///var/run/docker.sock") == nil {
		say("container engine: using the running Docker (/var/run/docker.sock)")
		return &Engine{Host: "unix:///var/run/docker.sock"}, nil
	}
	host := "unix://" + filepath.Join(runRoot, "docker.sock")
	if ping(ctx, host) == nil { // left by an earlier run of ours: reuse it
		say("container engine: using the isthmus dockerd already running at " + host)
		return &Engine{Host: host}, nil
	}
	if o.Dir == "" {
		return nil, errors.New("engine: no Docker is running and no directory was given for one")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("engine: no Docker is running and starting one needs root: start Docker yourself (and set DOCKER_HOST), or run as root")
	}
	if err := ensureDocker(ctx, o.Install, say); err != nil {
		return nil, err
	}
	return startDaemon(ctx, o, host, say)
}

// ensureDocker makes sure dockerd, containerd, runc and the docker CLI (which kind runs)
// are installed.
func ensureDocker(ctx context.Context, install bool, say func(string)) error {
	var missing []string
	for _, b := range []string{"dockerd", "containerd", "runc", "docker"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	if !install {
		return fmt.Errorf("engine: %s not installed: apt-get install docker.io, or start Docker and set DOCKER_HOST", strings.Join(missing, ", "))
	}
	say("container engine: installing Debian's docker.io (missing: " + strings.Join(missing, ", ") + ")")
	// The package must not start its service: dockerd's default bridge would be a container
	// network made behind the caller's back.
	const policy = "/usr/sbin/policy-rc.d"
	if _, err := os.Stat(policy); os.IsNotExist(err) {
		if err := os.WriteFile(policy, []byte("#!/bin/sh\nexit 101\n"), 0o755); err != nil {
			return fmt.Errorf("engine: keep apt from starting services: %w", err)
		}
		defer os.Remove(policy)
	}
	for _, args := range [][]string{{"update", "-qq"}, {"install", "-y", "-qq", "docker.io"}} {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("engine: apt-get %s: %v: %s", strings.Join(args, " "), err, tail(string(out), 800))
		}
	}
	return nil
}

func startDaemon(ctx context.Context, o Options, host string, say func(string)) (*Engine, error) {
	data := filepath.Join(o.Dir, "data")
	for _, d := range []string{data, runRoot} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("engine: %w", err)
		}
	}
	e := &Engine{Host: host, Started: true, log: filepath.Join(o.Dir, "dockerd.log")}
	args := []string{
		"--data-root", data,
		"--exec-root", filepath.Join(runRoot, "exec"),
		"--host", host,
		"--pidfile", filepath.Join(runRoot, "dockerd.pid"),
		"--storage-driver", "overlay2",
		"--exec-opt", "native.cgroupdriver=cgroupfs",
		"--bridge", "none", // no default network: every container network is one we make
		"--log-level", "warn",
	}
	has, err := boundingSetHas(24) // CAP_SYS_RESOURCE
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	if !has {
		wrapper, err := writeWrapper(runRoot)
		if err != nil {
			return nil, err
		}
		e.wrapper = wrapper
		args = append(args, "--add-runtime", "isthmus-runc="+wrapper, "--default-runtime", "isthmus-runc")
		e.Wrapped = true
		say("container engine: CAP_SYS_RESOURCE is not in the bounding set; runc runs through a wrapper that drops it")
	}
	logf, err := os.OpenFile(e.log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	defer logf.Close()
	if e.host, err = recordHost(); err != nil {
		return nil, fmt.Errorf("engine: record the host's forwarding state: %w", err)
	}
	say("container engine: starting dockerd (data " + data + ")")
	e.cmd = exec.Command("dockerd", args...)
	e.cmd.Stdout, e.cmd.Stderr = logf, logf
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := e.cmd.Start(); err != nil {
		return nil, fmt.Errorf("engine: start dockerd: %w", err)
	}
	e.done = make(chan struct{})
	go func() { e.cmd.Wait(); close(e.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if ping(ctx, host) == nil {
			break
		}
		select {
		case <-e.done:
			e.host.restore()
			return nil, fmt.Errorf("engine: dockerd exited during start-up: %s", e.logTail())
		case <-ctx.Done():
			e.Stop()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			e.Stop()
			return nil, fmt.Errorf("engine: dockerd did not answer on %s within 60s: %s", host, e.logTail())
		}
	}
	// dockerd inserted its own FORWARD rules; the guard's must still hold.
	if err := o.Guard.Check(); err != nil {
		e.Stop()
		return nil, fmt.Errorf("engine: after dockerd started: %w", err)
	}
	return e, nil
}

// writeWrapper writes the runtime script dockerd is given: it runs this executable as the
// wrapper (see init in wrapper.go) with the real runc's path.
func writeWrapper(dir string) (string, error) {
	real, err := exec.LookPath("runc")
	if err != nil {
		return "", errors.New("engine: runc is not installed (apt-get install runc)")
	}
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("engine: find this executable for the runc wrapper: %w", err)
	}
	path := filepath.Join(dir, fmt.Sprintf("runc-wrapper-%d", os.Getpid()))
	script := fmt.Sprintf("#!/bin/sh\n%s=%s exec %s \"$@\"\n", realRuncEnv, shellQuote(real), shellQuote(self))
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		return "", fmt.Errorf("engine: %w", err)
	}
	return path, nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Env returns the environment entry that points docker clients (and kind) at the engine.
func (e *Engine) Env() string { return "DOCKER_HOST=" + e.Host }

// Stop stops a daemon Start started (SIGTERM, then SIGKILL after 20 s) with its managed
// containerd, then puts back what dockerd changed on the host and leaves behind (IPv4
// forwarding, the FORWARD policy, its chains). An engine that was already running is left
// alone. Its data stays.
func (e *Engine) Stop() error {
	if e == nil || e.cmd == nil || e.cmd.Process == nil {
		return nil
	}
	pgid := -e.cmd.Process.Pid
	syscall.Kill(pgid, syscall.SIGTERM)
	select {
	case <-e.done:
	case <-time.After(20 * time.Second):
		syscall.Kill(pgid, syscall.SIGKILL)
		<-e.done
	}
	e.cmd = nil
	if e.wrapper != "" {
		os.Remove(e.wrapper)
	}
	if e.host != nil {
		if err := e.host.restore(); err != nil {
			return fmt.Errorf("engine: restore the host's forwarding state after dockerd: %w", err)
		}
	}
	return nil
}

func (e *Engine) logTail() string {
	b, _ := os.ReadFile(e.log)
	return tail(string(b), 1500)
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// ping asks the daemon at host ("unix:///path") for /_ping.
func ping(ctx context.Context, host string) error {
	path, ok := strings.CutPrefix(host, "unix://")
	if !ok {
		return fmt.Errorf("only unix:// hosts are supported here, not %q", host)
	}
	c := http.Client{
		Timeout: 2 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/_ping", nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/_ping: %s", resp.Status)
	}
	return nil
}
