package main

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestScenarioCLI drives `isthmus scenario` and `isthmus up/down` as a user would: exit
// codes, JSON reports, refusals, and nothing left behind.
func TestScenarioCLI(t *testing.T) {
	bin := buildIsthmus(t)

	t.Run("list", func(t *testing.T) {
		out, _, err := run(t, bin, "scenario", "list", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var rows []struct{ Name string }
		if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) < 3 {
			t.Fatalf("scenario list -o json: %v\n%s", err, out)
		}
		show, _, err := run(t, bin, "scenario", "show", "multi-network")
		if err != nil || !strings.Contains(show, "gateway: true") || !strings.HasPrefix(show, "#") {
			t.Fatalf("scenario show prints the file with its comments: %v\n%s", err, show)
		}
	})

	t.Run("invalid topology is refused before anything starts", func(t *testing.T) {
		f := filepath.Join(t.TempDir(), "bad.yaml")
		os.WriteFile(f, []byte("name: bad\nnetworks: [{name: n1}]\nclusters:\n  - {name: c1, network: n9, podCIDR: 10.1.0.0/16, controlPlane: {role: primary}}\nworkloads: []\nexpect: []\n"), 0o644)
		start := time.Now()
		_, stderr, err := run(t, bin, "scenario", "run", "-f", f, "--state-dir", t.TempDir())
		if exitCode(err) != 1 || !strings.Contains(stderr, `clusters[0].network: unknown network "n9"`) {
			t.Fatalf("exit %d, stderr:\n%s", exitCode(err), stderr)
		}
		if time.Since(start) > 10*time.Second {
			t.Errorf("refusal took %s: something started", time.Since(start))
		}
	})

	t.Run("bad faults are refused before anything starts", func(t *testing.T) {
		start := time.Now()
		_, stderr, err := run(t, bin, "scenario", "run", "multi-network", "--state-dir", t.TempDir(),
			"--fault", "gateway-kill:network-9@5s+10s", "--fault", "primary-kill:cluster-1@5s+0s", "--fault", "partition:network-2@1s+10s", "--fault", "partition:network-2@5s+10s")
		for _, want := range []string{`faults[0]: target: unknown network "network-9"`, "faults[1].duration: 0s is not positive",
			"faults[2] and faults[3]: partition-network-2 (1s–11s) and partition-network-2 (5s–15s) overlap on the links of network-2", "are the --fault flags"} {
			if exitCode(err) != 1 || !strings.Contains(stderr, want) {
				t.Errorf("exit %d, stderr lacks %q:\n%s", exitCode(err), want, stderr)
			}
		}
		if _, stderr, err := run(t, bin, "scenario", "run", "--fault", "gateway-kill:network-2", "--state-dir", t.TempDir()); exitCode(err) != 1 || !strings.Contains(stderr, "KIND:TARGET@START+DURATION") {
			t.Errorf("a fault without its time: exit %d, %s", exitCode(err), stderr)
		}
		if time.Since(start) > 10*time.Second {
			t.Errorf("refusal took %s: something started", time.Since(start))
		}
	})

	if testing.Short() {
		t.Skip("integration test: starts real clusters; runs without -short")
	}
	if _, err := kubetest.Binaries(); err != nil {
		t.Fatal(err)
	}

	t.Run("run passes and reports JSON", func(t *testing.T) {
		stdout, stderr, err := run(t, bin, "scenario", "run", "single-cluster", "-o", "json", "--state-dir", t.TempDir())
		if err != nil {
			t.Fatalf("%v\n%s", err, stderr)
		}
		var rep scenarios.Report
		if err := json.Unmarshal([]byte(stdout), &rep); err != nil || !rep.Passed || len(rep.Cells) != 1 {
			t.Fatalf("report %+v (%v)\n%s", rep, err, stdout)
		}
		if !strings.Contains(stderr, "scenario single-cluster is up") {
			t.Errorf("no progress on stderr:\n%s", stderr)
		}
	})

	t.Run("a wrong expectation exits 1 with the failing cell", func(t *testing.T) {
		src, _ := scenarios.BuiltinSource("multi-primary")
		wrong := strings.Replace(string(src), "{from: cluster-1, service: echo.demo, reach: [cluster-1, cluster-2]}", "{from: cluster-1, service: echo.demo, reach: [cluster-1]}", 1)
		f := filepath.Join(t.TempDir(), "wrong.yaml")
		os.WriteFile(f, []byte(wrong), 0o644)
		state := t.TempDir()
		stdout, stderr, err := run(t, bin, "scenario", "run", "-f", f, "--timeout", "5s", "--state-dir", state)
		if exitCode(err) != 1 {
			t.Fatalf("exit %d\n%s\n%s", exitCode(err), stdout, stderr)
		}
		if !strings.Contains(stdout, "cluster-1 → echo.demo: cluster-2 answered (direct) but is not expected to") || !strings.Contains(stdout, "FAIL") {
			t.Fatalf("the failing cell and its reason are missing:\n%s", stdout)
		}
		if left := processesMentioning(state); len(left) > 0 {
			t.Errorf("processes left after a failed run: %v", left)
		}
	})

	t.Run("up --detach, down", func(t *testing.T) {
		state := t.TempDir()
		stdout, stderr, err := run(t, bin, "up", "--detach", "--scenario", "single-cluster", "--state-dir", state)
		if err != nil {
			t.Fatalf("%v\n%s\n%s", err, stdout, stderr)
		}
		for _, want := range []string{"every expectation holds", "Explore it:", "isthmus status --primary", "isthmus down single-cluster"} {
			if !strings.Contains(stdout, want) {
				t.Errorf("up output lacks %q:\n%s", want, stdout)
			}
		}
		if _, stderr, err := run(t, bin, "up", "--scenario", "single-cluster", "--state-dir", state); exitCode(err) != 1 || !strings.Contains(stderr, "already running") {
			t.Errorf("a second up of a running scenario: exit %d, %s", exitCode(err), stderr)
		}
		out, _, err := run(t, bin, "down", "single-cluster", "--state-dir", state)
		if err != nil || !strings.Contains(out, "stopped 1 scenario") {
			t.Fatalf("down: %v\n%s", err, out)
		}
		if left := processesMentioning(state); len(left) > 0 {
			t.Errorf("processes left after down: %v", left)
		}
		if out, _, _ := run(t, bin, "down", "--state-dir", state); !strings.Contains(out, "no scenario is running") {
			t.Errorf("second down: %s", out)
		}
	})

	t.Run("Ctrl-C while starting leaves nothing", func(t *testing.T) {
		state := t.TempDir()
		cmd := exec.Command(bin, "up", "--scenario", "multi-primary", "--state-dir", state)
		// A file, not a buffer: the child writes it while the test reads it.
		logPath := filepath.Join(t.TempDir(), "up.out")
		logf, err := os.Create(logPath)
		if err != nil {
			t.Fatal(err)
		}
		defer logf.Close()
		cmd.Stdout, cmd.Stderr = logf, logf
		output := func() string { b, _ := os.ReadFile(logPath); return string(b) }
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		kubetest.Eventually(t, 60*time.Second, "clusters starting", func() error {
			if !strings.Contains(output(), "starting 2 cluster(s)") {
				return errors.New("not yet")
			}
			return nil
		})
		cmd.Process.Signal(syscall.SIGINT)
		err = cmd.Wait()
		if code := exitCode(err); code != 130 {
			t.Errorf("exit %d after Ctrl-C, want 130\n%s", code, output())
		}
		if left := processesMentioning(state); len(left) > 0 {
			t.Errorf("processes left after Ctrl-C: %v\n%s", left, output())
		}
	})
}
