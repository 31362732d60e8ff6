package istiobin

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/buildlock"
)

// Version is the istio.io/istio module version tools/istio pins (a pseudo-version of
// Istio's master branch; its VERSION file says 1.31). The cache is keyed by it.
const Version = "v0.0.0-20260827124520-eed52ebb66ad"

// Names of the binaries a Set holds.
const (
	// Discovery is istiod's binary: `pilot-discovery discovery` runs the control plane.
	Discovery = "pilot-discovery"
	// Istioctl is Istio's CLI.
	Istioctl = "istioctl"
)

// All lists the binaries one build makes.
var All = []string{Discovery, Istioctl}

// CRDs is the file, beside the binaries, of every Istio CustomResourceDefinition at
// Version (manifests/charts/base/files/crd-all.gen.yaml of the module): istiod waits for
// its CRDs before it serves, so tests apply it to istiod's cluster first.
const CRDs = "crd-all.gen.yaml"

// crdSource is where CRDs is in the istio.io/istio module.
var crdSource = filepath.Join("manifests", "charts", "base", "files", "crd-all.gen.yaml")

// packages are the main packages of All, built by the tools module's tool directives.
var packages = map[string]string{
	Discovery: "istio.io/istio/pilot/cmd/pilot-discovery",
	Istioctl:  "istio.io/istio/istioctl/cmd/istioctl",
}

// Options says where the cache is and how to build. The zero value works from inside an
// Isthmus checkout.
type Options struct {
	// CacheDir is the cache root; "" means $ISTHMUS_ISTIO_CACHE, else
	// <os.UserCacheDir()>/isthmus/istio.
	CacheDir string
	// ToolsDir is the tools/istio module; "" means search upward from the working
	// directory.
	ToolsDir string
	// GoCommand is the go command to build with; "" means "go" on PATH.
	GoCommand string
	// Progress receives build steps; nil discards.
	Progress io.Writer
}

// Set is a complete cached build: every binary of All, and CRDs, in Dir.
type Set struct {
	// Dir is the cache directory, istio-<Version>.
	Dir string
}

// Path returns the path of binary name (one of All), or of CRDs.
func (s *Set) Path(name string) string { return filepath.Join(s.Dir, name) }

// Dir returns the cache directory of this Version, whether or not it exists yet.
func (o Options) Dir() (string, error) {
	root := o.CacheDir
	if root == "" {
		root = os.Getenv("ISTHMUS_ISTIO_CACHE")
	}
	if root == "" {
		ucd, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("istiobin: no cache directory (set ISTHMUS_ISTIO_CACHE): %w", err)
		}
		root = filepath.Join(ucd, "isthmus", "istio")
	}
	return filepath.Join(root, "istio-"+Version), nil
}

// Lookup returns the cached Set, or an error that names the missing binaries and says how
// to build them.
func Lookup(o Options) (*Set, error) {
	dir, err := o.Dir()
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, name := range append(All[:len(All):len(All)], CRDs) {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || !st.Mode().IsRegular() || (name != CRDs && st.Mode()&0o111 == 0) {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("istiobin: %s missing in %s; build them with `make peers` (go run ./internal/istiobin/ensure, 15-35 minutes once per version, by load)",
			strings.Join(missing, ", "), dir)
	}
	return &Set{Dir: dir}, nil
}

// Ensure returns the cached Set, building it first when any binary is missing. Only one
// process builds at a time; the others wait for it (saying so on Progress) and reuse its
// result.
func Ensure(ctx context.Context, o Options) (*Set, error) {
	if s, err := Lookup(o); err == nil {
		return s, nil
	}
	dir, err := o.Dir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, fmt.Errorf("istiobin: create cache: %w", err)
	}
	unlock, err := buildlock.Acquire(ctx, filepath.Join(filepath.Dir(dir), ".build.lock"), "istiod and istioctl", o.Progress)
	if err != nil {
		return nil, fmt.Errorf("istiobin: %w", err)
	}
	defer unlock()
	if s, err := Lookup(o); err == nil { // built by the process we waited for
		return s, nil
	}
	if err := build(ctx, o, dir); err != nil {
		return nil, err
	}
	return Lookup(o)
}

// Ldflags stamp the version the way Istio's own build does (pkg/version), so that
// `istioctl version` and istiod's logs name the build instead of "unknown".
func Ldflags() string {
	rev := Version[strings.LastIndexByte(Version, '-')+1:]
	return strings.Join([]string{
		"-s", "-w",
		"-X istio.io/istio/pkg/version.buildVersion=1.31-dev+" + rev,
		"-X istio.io/istio/pkg/version.buildGitRevision=" + rev,
		"-X istio.io/istio/pkg/version.buildStatus=Clean",
	}, " ")
}

// build compiles every binary of All in one go build into a temporary directory beside
// dir, then renames it into place, so that the cache is complete or absent.
func build(ctx context.Context, o Options, dir string) error {
	tools := o.ToolsDir
	if tools == "" {
		wd, err := os.Getwd()
		if err != nil {
			return fmt.Errorf("istiobin: %w", err)
		}
		if tools, err = FindToolsDir(wd); err != nil {
			return err
		}
	}
	if err := checkToolsVersion(tools); err != nil {
		return err
	}
	gocmd := o.GoCommand
	if gocmd == "" {
		gocmd = "go"
	}
	if _, err := exec.LookPath(gocmd); err != nil {
		return fmt.Errorf("istiobin: building istiod and istioctl needs the Go toolchain (%q not found: %v)", gocmd, err)
	}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "building-")
	if err != nil {
		return fmt.Errorf("istiobin: %w", err)
	}
	defer os.RemoveAll(tmp)
	fmt.Fprintf(progress, "building %s from istio.io/istio %s into %s (once per version; 15-35 minutes on 2 cores, by load)\n",
		strings.Join(All, " and "), Version, dir)
	args := []string{"build", "-trimpath", "-ldflags", Ldflags(), "-o", tmp + string(filepath.Separator)}
	for _, name := range All {
		args = append(args, packages[name])
	}
	cmd := exec.CommandContext(ctx, gocmd, args...)
	cmd.Dir = tools
	// The tools module builds on its own pins: no workspace may swap its dependencies,
	// and a build never rewrites its go.mod or go.sum. Istio's release build is static.
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly", "CGO_ENABLED=0")
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("istiobin: build interrupted: %w", ctx.Err())
		}
		return fmt.Errorf("istiobin: go build in %s failed after %s: %v\n%s\ncheck that the Go module proxy is reachable (GOPROXY)",
			tools, time.Since(start).Round(time.Second), err, lastLines(out, 40))
	}
	for _, name := range All {
		if _, err := os.Stat(filepath.Join(tmp, name)); err != nil {
			return fmt.Errorf("istiobin: go build succeeded but produced no %s: %w", name, err)
		}
	}
	if err := copyCRDs(ctx, gocmd, tools, filepath.Join(tmp, CRDs)); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("istiobin: clear old cache: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("istiobin: install binaries: %w", err)
	}
	fmt.Fprintf(progress, "built %s in %s\n", strings.Join(All, " and "), time.Since(start).Round(time.Second))
	return nil
}

// copyCRDs copies the module's CRD file to dst; the module is in the module cache once
// go build has run.
func copyCRDs(ctx context.Context, gocmd, tools, dst string) error {
	cmd := exec.CommandContext(ctx, gocmd, "list", "-m", "-f", "{{.Dir}}", "istio.io/istio")
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("istiobin: find the istio.io/istio module: %w", err)
	}
	data, err := os.ReadFile(filepath.Join(strings.TrimSpace(string(out)), crdSource))
	if err != nil {
		return fmt.Errorf("istiobin: Istio's CRDs: %w", err)
	}
	if err := os.WriteFile(dst, data, 0o644); err != nil {
		return fmt.Errorf("istiobin: Istio's CRDs: %w", err)
	}
	return nil
}

// FindToolsDir searches from dir upward for tools/istio/go.mod and returns that directory.
func FindToolsDir(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		c := filepath.Join(d, "tools", "istio")
		if _, err := os.Stat(filepath.Join(c, "go.mod")); err == nil {
			return c, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("istiobin: no tools/istio/go.mod in %s or any parent; run from an Isthmus checkout", dir)
		}
	}
}

// checkToolsVersion makes sure the tools module pins Version, so that the cache key never
// describes binaries of another version.
func checkToolsVersion(dir string) error {
	data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return fmt.Errorf("istiobin: read tools module: %w", err)
	}
	if want := "istio.io/istio " + Version; !bytes.Contains(data, []byte(want)) {
		return fmt.Errorf("istiobin: %s/go.mod does not require %s; update istiobin.Version with it", dir, want)
	}
	return nil
}

// lastLines returns at most the last n lines of out, for error messages.
func lastLines(out []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
