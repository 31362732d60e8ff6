package engine

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestSubcommandAndFlags(t *testing.T) {
	args := []string{"--root", "/run/runc", "--log", "/x/log.json", "--log-format", "json", "--systemd-cgroup", "create", "--bundle", "/b", "--pid-file", "/p", "id"}
	cmd, rest := subcommand(args)
	if cmd != "create" || flagValue(rest, "bundle", "b") != "/b" {
		t.Fatalf("subcommand = %q, bundle %q", cmd, flagValue(rest, "bundle", "b"))
	}
	cmd, rest = subcommand([]string{"--root=/r", "exec", "--process=/tmp/p.json", "--detach", "id"})
	if cmd != "exec" || flagValue(rest, "process", "p") != "/tmp/p.json" {
		t.Fatalf("exec: %q %q", cmd, flagValue(rest, "process", "p"))
	}
	if cmd, _ := subcommand([]string{"--root", "/r", "state", "id"}); cmd != "state" {
		t.Fatalf("state: %q", cmd)
	}
}

func TestRewriteSpecs(t *testing.T) {
	dir := t.TempDir()
	spec := `{"ociVersion":"1.2.0","process":{"args":["/x"],"capabilities":{"bounding":["CAP_CHOWN","CAP_SYS_RESOURCE"],"effective":["CAP_SYS_RESOURCE"],"permitted":["CAP_CHOWN"]},"user":{"uid":0}},"root":{"path":"rootfs"},"unknownField":{"kept":true}}`
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(spec), 0o600)
	if err := rewriteSpecs([]string{"--root", "/r", "create", "--bundle", dir, "id"}); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Process struct {
			Args         []string            `json:"args"`
			Capabilities map[string][]string `json:"capabilities"`
		} `json:"process"`
		Unknown map[string]bool `json:"unknownField"`
	}
	b, _ := os.ReadFile(filepath.Join(dir, "config.json"))
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	for set, caps := range got.Process.Capabilities {
		if slices.Contains(caps, capSysResource) {
			t.Errorf("%s still has %s", set, capSysResource)
		}
	}
	if !slices.Equal(got.Process.Capabilities["bounding"], []string{"CAP_CHOWN"}) || !got.Unknown["kept"] || got.Process.Args[0] != "/x" {
		t.Fatalf("other fields changed: %s", b)
	}

	proc := filepath.Join(dir, "process.json")
	os.WriteFile(proc, []byte(`{"args":["sh"],"capabilities":{"bounding":["CAP_SYS_RESOURCE","CAP_NET_ADMIN"]}}`), 0o600)
	if err := rewriteSpecs([]string{"exec", "--process", proc, "id"}); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(proc)
	if string(b) != `{"args":["sh"],"capabilities":{"bounding":["CAP_NET_ADMIN"]}}` {
		t.Fatalf("process file = %s", b)
	}

	os.WriteFile(proc, []byte(`{"args":`), 0o600)
	if err := rewriteSpecs([]string{"exec", "-p", proc, "id"}); err == nil {
		t.Fatal("a truncated process file was accepted")
	}
	if err := rewriteSpecs([]string{"delete", "id"}); err != nil {
		t.Fatalf("delete must pass through: %v", err)
	}
}

func FuzzDropCapability(f *testing.F) {
	f.Add([]byte(`{"process":{"capabilities":{"bounding":["CAP_SYS_RESOURCE"]}}}`), true)
	f.Add([]byte(`{"capabilities":{"effective":["CAP_SYS_RESOURCE","CAP_CHOWN"]}}`), false)
	f.Fuzz(func(t *testing.T, b []byte, spec bool) {
		out, changed, err := dropCapability(b, spec)
		if err != nil || !changed {
			return
		}
		// A changed document no longer names the capability and is still JSON.
		again, changed2, err := dropCapability(out, spec)
		if err != nil || changed2 || string(again) != string(out) {
			t.Fatalf("second pass changed=%v err=%v on %s", changed2, err, out)
		}
	})
}
