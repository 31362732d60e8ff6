package kubebin

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func writeExe(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// fakeTools makes a tools module directory whose go.mod pins the expected versions.
func fakeTools(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "tools", "k8s")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mod := "module x\nrequire (\n\tk8s.io/kubernetes " + KubernetesVersion + "\n\tgo.etcd.io/etcd/server/v3 " + EtcdVersion + "\n)\n"
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte(mod), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// fakeGo is a stand-in go command: `list` prints four packages, `build` records the call in
// count and creates every binary in its -o directory (or fails when told to).
func fakeGo(t *testing.T, fail bool) (gocmd, count string) {
	dir := t.TempDir()
	count = filepath.Join(dir, "builds")
	failPart := ""
	if fail {
		failPart = `echo "k8s.io/kubernetes/pkg/broken" >&2; echo "pkg/broken/x.go:1: syntax error" >&2; exit 1`
	}
	script := `#!/bin/sh
case "$1" in
list) printf 'a\nb\nc\nd\n' ;;
build)
  echo build >> ` + count + `
  ` + failPart + `
  while [ "$1" != "-o" ]; do shift; done
  out="$2"
  for b in etcd kube-apiserver kube-controller-manager kubectl; do printf '#!/bin/sh\n' > "$out$b"; chmod +x "$out$b"; done
  echo k8s.io/kubernetes/cmd/kubectl >&2
  ;;
esac
`
	gocmd = filepath.Join(dir, "go")
	writeExe(t, gocmd, script)
	return gocmd, count
}

func TestLookupPrefersAssetsAndNamesMissing(t *testing.T) {
	assets := t.TempDir()
	writeExe(t, filepath.Join(assets, Etcd), "#!/bin/sh\n")
	writeExe(t, filepath.Join(assets, APIServer), "#!/bin/sh\n")
	cache := t.TempDir()
	o := Options{AssetsDir: assets, CacheDir: cache}
	_, err := Lookup(o)
	if err == nil {
		t.Fatal("Lookup succeeded with two binaries missing")
	}
	for _, want := range []string{ControllerManager, Kubectl, "KUBEBUILDER_ASSETS=" + assets} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	bin, _ := o.BinDir()
	writeExe(t, filepath.Join(bin, ControllerManager), "#!/bin/sh\n")
	writeExe(t, filepath.Join(bin, Kubectl), "#!/bin/sh\n")
	writeExe(t, filepath.Join(bin, Etcd), "#!/bin/sh\n") // shadowed by assets
	set, err := Lookup(o)
	if err != nil {
		t.Fatal(err)
	}
	if set.Etcd != filepath.Join(assets, Etcd) || set.Kubectl != filepath.Join(bin, Kubectl) {
		t.Fatalf("wrong sources: %+v", set)
	}
	if set.Path(APIServer) != set.APIServer || set.Path("nope") != "" {
		t.Fatal("Path")
	}
}

func TestLookupIgnoresNonExecutables(t *testing.T) {
	assets := t.TempDir()
	for _, n := range All {
		os.WriteFile(filepath.Join(assets, n), nil, 0o644)
	}
	if _, err := Lookup(Options{AssetsDir: assets, CacheDir: t.TempDir()}); err == nil {
		t.Fatal("accepted non-executable files")
	}
}

func TestEnsureBuildsOnceForConcurrentCallers(t *testing.T) {
	gocmd, count := fakeGo(t, false)
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t), GoCommand: gocmd}
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() {
			_, errs[i] = Ensure(context.Background(), o)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	data, _ := os.ReadFile(count)
	if n := strings.Count(string(data), "build"); n != 1 {
		t.Fatalf("go build ran %d times; want 1", n)
	}
	set, err := Lookup(o)
	if err != nil || !strings.HasPrefix(set.APIServer, o.CacheDir) {
		t.Fatalf("Lookup after build: %+v, %v", set, err)
	}
}

func TestEnsureBuildFailureIsActionableAndLeavesNoCache(t *testing.T) {
	gocmd, _ := fakeGo(t, true)
	var progress bytes.Buffer
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t), GoCommand: gocmd, Progress: &progress}
	_, err := Ensure(context.Background(), o)
	if err == nil {
		t.Fatal("Ensure succeeded although go build failed")
	}
	for _, want := range []string{"go build", "syntax error", "GOPROXY"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
	if !strings.Contains(progress.String(), "about 7 minutes") {
		t.Errorf("progress did not say why the build takes long: %q", progress.String())
	}
	bin, _ := o.BinDir()
	if _, err := os.Stat(bin); !os.IsNotExist(err) {
		t.Fatalf("a failed build left %s behind", bin)
	}
	entries, _ := os.ReadDir(filepath.Dir(bin))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "bin-building-") {
			t.Fatalf("a failed build left %s behind", e.Name())
		}
	}
}

func TestEnsureWithoutGoOrTools(t *testing.T) {
	o := Options{CacheDir: t.TempDir(), ToolsDir: fakeTools(t), GoCommand: "/nonexistent/go"}
	if _, err := Ensure(context.Background(), o); err == nil || !strings.Contains(err.Error(), "KUBEBUILDER_ASSETS") {
		t.Fatalf("want an actionable error without go, got %v", err)
	}
	if _, err := FindToolsDir(t.TempDir()); err == nil || !strings.Contains(err.Error(), "Isthmus checkout") {
		t.Fatalf("want an actionable error outside a checkout, got %v", err)
	}
	bad := fakeTools(t)
	os.WriteFile(filepath.Join(bad, "go.mod"), []byte("module x\nrequire k8s.io/kubernetes v1.0.0\n"), 0o644)
	if err := checkToolsVersions(bad); err == nil || !strings.Contains(err.Error(), KubernetesVersion) {
		t.Fatalf("want a version mismatch error, got %v", err)
	}
}

func TestRepoToolsModulePinsVersions(t *testing.T) {
	dir, err := FindToolsDir(".")
	if err != nil {
		t.Fatal(err)
	}
	if err := checkToolsVersions(dir); err != nil {
		t.Fatal(err)
	}
}
