package istiobin

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeTools makes a tools module directory whose go.mod pins version.
func fakeTools(t *testing.T, version string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tools", "istio")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mod := "module x\nrequire istio.io/istio " + version + " // indirect\n"
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(mod), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// fakeGo is a stand-in go command: each `build` appends its arguments to a log and creates
// every binary in its -o directory, or fails when fail is set.
func fakeGo(t *testing.T, fail bool) (gocmd, log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "builds")
	failPart := ""
	if fail {
		failPart = `echo "pilot/pkg/broken/x.go:1: syntax error" >&2; exit 1`
	}
	mod := filepath.Join(dir, "istio-module")
	if err := os.MkdirAll(filepath.Join(mod, filepath.Dir(crdSource)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mod, crdSource), []byte("kind: CustomResourceDefinition\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `#!/bin/sh
if [ "$1" = list ]; then echo ` + mod + `; exit 0; fi
echo "$@" >> ` + log + `
` + failPart + `
while [ "$1" != "-o" ]; do shift; done
for b in pilot-discovery istioctl; do printf '#!/bin/sh\n' > "$2$b"; chmod +x "$2$b"; done
`
	gocmd = filepath.Join(dir, "go")
	if err := os.WriteFile(gocmd, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return gocmd, log
}

// TestEnsureBuildsOnceInOneGoBuild: a cold cache is filled by one go build of both
// packages with the version stamped; a warm one is used as it is.
func TestEnsureBuildsOnceInOneGoBuild(t *testing.T) {
	gocmd, log := fakeGo(t, false)
	var progress bytes.Buffer
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t, Version), GoCommand: gocmd, Progress: &progress}
	if _, err := Lookup(o); err == nil || !strings.Contains(err.Error(), "pilot-discovery, istioctl, crd-all.gen.yaml missing") || !strings.Contains(err.Error(), "make peers") {
		t.Fatalf("lookup in an empty cache: %v", err)
	}
	set, err := Ensure(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(o.CacheDir, "istio-"+Version); set.Dir != want {
		t.Fatalf("cache dir %s, want %s", set.Dir, want)
	}
	for _, name := range append(All, CRDs) {
		if _, err := os.Stat(set.Path(name)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Ensure(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	calls, _ := os.ReadFile(log)
	if n := strings.Count(string(calls), "\n"); n != 1 {
		t.Fatalf("%d go builds, want 1:\n%s", n, calls)
	}
	for _, want := range []string{"istio.io/istio/pilot/cmd/pilot-discovery", "istio.io/istio/istioctl/cmd/istioctl", "pkg/version.buildGitRevision=eed52ebb66ad"} {
		if !strings.Contains(string(calls), want) {
			t.Errorf("go build call lacks %q: %s", want, calls)
		}
	}
	if !strings.Contains(progress.String(), "15-35 minutes on 2 cores") {
		t.Errorf("progress: %q", progress.String())
	}
}

// TestFailedBuildLeavesNoCache: a failing build reports the compiler's lines and leaves
// nothing that Lookup would take for a complete cache.
func TestFailedBuildLeavesNoCache(t *testing.T) {
	gocmd, _ := fakeGo(t, true)
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t, Version), GoCommand: gocmd}
	if _, err := Ensure(context.Background(), o); err == nil || !strings.Contains(err.Error(), "syntax error") {
		t.Fatalf("failing build: %v", err)
	}
	if _, err := Lookup(o); err == nil {
		t.Fatal("a failed build left a cache")
	}
	entries, _ := os.ReadDir(o.CacheDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "building-") {
			t.Fatalf("temporary build directory left behind: %s", e.Name())
		}
	}
}

// TestToolsModuleMustPinVersion: a tools module of another version is refused before
// anything builds, and the repository's own tools/istio pins Version.
func TestToolsModuleMustPinVersion(t *testing.T) {
	gocmd, log := fakeGo(t, false)
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t, "v0.0.0-20200101000000-000000000000"), GoCommand: gocmd}
	if _, err := Ensure(context.Background(), o); err == nil || !strings.Contains(err.Error(), "update istiobin.Version") {
		t.Fatalf("wrong tools version: %v", err)
	}
	if _, err := os.Stat(log); err == nil {
		t.Fatal("built despite the wrong version")
	}
	tools, err := FindToolsDir(".")
	if err != nil {
		t.Fatal(err)
	}
	if err := checkToolsVersion(tools); err != nil {
		t.Fatal(err)
	}
}
