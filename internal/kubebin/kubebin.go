package kubebin

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/buildlock"
)

// Versions of the components the tools module pins. The cache key is derived from them, so
// a version change never reuses stale binaries.
const (
	KubernetesVersion = "v1.37.2"
	EtcdVersion       = "v3.7.3"
)

// Names of the binaries, as they appear on disk.
const (
	Etcd              = "etcd"
	APIServer         = "kube-apiserver"
	ControllerManager = "kube-controller-manager"
	Kubectl           = "kubectl"
)

// All lists every binary Ensure provides.
var All = []string{Etcd, APIServer, ControllerManager, Kubectl}

// packages maps each binary to the package the tools module builds it from.
var packages = map[string]string{
	Etcd:              "./etcd",
	APIServer:         "k8s.io/kubernetes/cmd/kube-apiserver",
	ControllerManager: "k8s.io/kubernetes/cmd/kube-controller-manager",
	Kubectl:           "k8s.io/kubernetes/cmd/kubectl",
}

// CacheKey names the cache subdirectory for the pinned versions.
func CacheKey() string { return "k8s-" + KubernetesVersion + "-etcd-" + EtcdVersion }

// Options says where to look for binaries and how to build them. The zero value works from
// inside an Isthmus checkout: the default cache, no assets directory, no progress output.
type Options struct {
	// AssetsDir is an envtest assets directory (the value of KUBEBUILDER_ASSETS). Binaries
	// found there are used as they are; missing ones come from the cache.
	AssetsDir string
	// CacheDir is the root of the binary cache; "" means <os.UserCacheDir()>/isthmus/k8s.
	CacheDir string
	// ToolsDir is the tools/k8s module to build from; "" means search upward from the
	// working directory for tools/k8s/go.mod.
	ToolsDir string
	// Progress receives one line per build step; nil discards them.
	Progress io.Writer
	// GoCommand is the go tool to build with; "" means "go" from PATH.
	GoCommand string
}

// OptionsFromEnv returns Options filled from the environment the way the isthmus command and
// the test helpers read it: KUBEBUILDER_ASSETS for AssetsDir and ISTHMUS_K8S_CACHE for
// CacheDir. Library code takes Options; only entry points call this.
func OptionsFromEnv() Options {
	return Options{
		AssetsDir: os.Getenv("KUBEBUILDER_ASSETS"),
		CacheDir:  os.Getenv("ISTHMUS_K8S_CACHE"),
	}
}

// Set holds the absolute path of each binary.
type Set struct {
	Etcd              string `json:"etcd"`
	APIServer         string `json:"kubeAPIServer"`
	ControllerManager string `json:"kubeControllerManager"`
	Kubectl           string `json:"kubectl"`
}

// Path returns the path of the named binary, or "" for an unknown name.
func (s *Set) Path(name string) string {
	switch name {
	case Etcd:
		return s.Etcd
	case APIServer:
		return s.APIServer
	case ControllerManager:
		return s.ControllerManager
	case Kubectl:
		return s.Kubectl
	}
	return ""
}

func (s *Set) set(name, path string) {
	switch name {
	case Etcd:
		s.Etcd = path
	case APIServer:
		s.APIServer = path
	case ControllerManager:
		s.ControllerManager = path
	case Kubectl:
		s.Kubectl = path
	}
}

// BinDir returns the directory that holds (or will hold) the cached binaries.
func (o Options) BinDir() (string, error) {
	root := o.CacheDir
	if root == "" {
		ucd, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("kubebin: no cache directory (set ISTHMUS_K8S_CACHE): %w", err)
		}
		root = filepath.Join(ucd, "isthmus", "k8s")
	}
	return filepath.Join(root, CacheKey(), "bin"), nil
}

// Lookup returns the binaries without building anything. It fails, naming what is missing
// and how to get it, when any binary is found neither in AssetsDir nor in the cache.
func Lookup(o Options) (*Set, error) {
	set, missing, err := lookup(o)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		bin, _ := o.BinDir()
		return nil, fmt.Errorf("kubebin: %s not found in %s%s; build them with `isthmus cluster binaries` "+
			"(or any isthmus command that starts clusters), or set KUBEBUILDER_ASSETS to a directory that has them",
			strings.Join(missing, ", "), bin, assetsNote(o))
	}
	return set, nil
}

func assetsNote(o Options) string {
	if o.AssetsDir == "" {
		return ""
	}
	return " or KUBEBUILDER_ASSETS=" + o.AssetsDir
}

// lookup finds each binary in AssetsDir first, then in the cache, accepting only
// executable regular files, and returns the names it could not find. An error means the
// cache directory cannot be named at all.
func lookup(o Options) (*Set, []string, error) {
	bin, err := o.BinDir()
	if err != nil {
		return nil, nil, err
	}
	set := &Set{}
	var missing []string
	for _, name := range All {
		found := ""
		for _, dir := range []string{o.AssetsDir, bin} {
			if dir == "" {
				continue
			}
			p := filepath.Join(dir, name)
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
				found, _ = filepath.Abs(p)
				break
			}
		}
		if found == "" {
			missing = append(missing, name)
			continue
		}
		set.set(name, found)
	}
	return set, missing, nil
}

// Ensure returns the binaries, building the missing ones into the cache first. Only one
// process builds at a time (an flock on <cache>/<key>/.build.lock); the others wait for it
// (reporting that they wait to Progress, cancellable through ctx) and reuse its result.
// A build compiles all four binaries, even those AssetsDir has, and replaces the whole
// cache directory, so the cache is complete or absent; AssetsDir still wins on lookup.
func Ensure(ctx context.Context, o Options) (*Set, error) {
	if set, missing, err := lookup(o); err != nil {
		return nil, err
	} else if len(missing) == 0 {
		return set, nil
	}
	bin, err := o.BinDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		return nil, fmt.Errorf("kubebin: create cache: %w", err)
	}
	unlock, err := buildlock.Acquire(ctx, filepath.Join(filepath.Dir(bin), ".build.lock"), "the Kubernetes binaries", o.Progress)
	if err != nil {
		return nil, fmt.Errorf("kubebin: %w", err)
	}
	defer unlock()
	// Another process may have finished the build while we waited for the lock.
	if set, missing, err := lookup(o); err != nil {
		return nil, err
	} else if len(missing) == 0 {
		return set, nil
	}
	if err := build(ctx, o, bin); err != nil {
		return nil, err
	}
	return Lookup(o)
}

// FindToolsDir searches from dir upward for tools/k8s/go.mod and returns that directory.
func FindToolsDir(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		candidate := filepath.Join(d, "tools", "k8s")
		if _, err := os.Stat(filepath.Join(candidate, "go.mod")); err == nil {
			return candidate, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("kubebin: no tools/k8s/go.mod in %s or any parent; run from an Isthmus checkout, "+
				"or set KUBEBUILDER_ASSETS to a directory holding %s", dir, strings.Join(All, ", "))
		}
	}
}

// ldflags stamps the version into the binaries the way Kubernetes' own build does, so that
// the API server's /version reports KubernetesVersion instead of v0.0.0
// (TestClusterReportsVersionAndNode checks it); -s -w drop symbols to keep the cache small.
func ldflags() string {
	v := strings.TrimPrefix(KubernetesVersion, "v")
	parts := strings.SplitN(v, ".", 3)
	return strings.Join([]string{
		"-s", "-w",
		"-X k8s.io/component-base/version.gitVersion=" + KubernetesVersion,
		"-X k8s.io/component-base/version.gitMajor=" + parts[0],
		"-X k8s.io/component-base/version.gitMinor=" + parts[1],
		"-X k8s.io/component-base/version.gitTreeState=clean",
		"-X k8s.io/client-go/pkg/version.gitVersion=" + KubernetesVersion,
		"-X k8s.io/client-go/pkg/version.gitMajor=" + parts[0],
		"-X k8s.io/client-go/pkg/version.gitMinor=" + parts[1],
	}, " ")
}

// build compiles all binaries into a temporary directory beside bin and renames it into
// place, so that a failed or interrupted build never leaves a partial cache.
func build(ctx context.Context, o Options, bin string) error {
	tools := o.ToolsDir
	if tools == "" {
		wd, err := os.Getwd()
		if err != nil {
			return fmt.Errorf("kubebin: %w", err)
		}
		if tools, err = FindToolsDir(wd); err != nil {
			return err
		}
	}
	if err := checkToolsVersions(tools); err != nil {
		return err
	}
	gocmd := o.GoCommand
	if gocmd == "" {
		gocmd = "go"
	}
	if _, err := exec.LookPath(gocmd); err != nil {
		return fmt.Errorf("kubebin: building the Kubernetes binaries needs the Go toolchain (%q not found: %v); "+
			"install Go 1.26, or set KUBEBUILDER_ASSETS to a directory holding %s", gocmd, err, strings.Join(All, ", "))
	}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	pkgs := make([]string, 0, len(All))
	for _, name := range All {
		pkgs = append(pkgs, packages[name])
	}
	total := countDeps(ctx, gocmd, tools, pkgs)
	fmt.Fprintf(progress, "building %s from Kubernetes %s and etcd %s into %s\n", strings.Join(All, ", "), KubernetesVersion, EtcdVersion, bin)
	fmt.Fprintf(progress, "  this happens once per version: about 7 minutes and 3 GB of memory on 2 cores, then it is cached\n")

	tmp, err := os.MkdirTemp(filepath.Dir(bin), "bin-building-")
	if err != nil {
		return fmt.Errorf("kubebin: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := append([]string{"build", "-v", "-o", tmp + string(filepath.Separator), "-ldflags", ldflags()}, pkgs...)
	cmd := exec.CommandContext(ctx, gocmd, args...)
	cmd.Dir = tools
	// The tools module builds on its own pins: no workspace may swap its dependencies,
	// and a build must never rewrite its go.mod or go.sum.
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly")
	cmd.Stdout = io.Discard
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return fmt.Errorf("kubebin: %w", err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("kubebin: start go build: %w", err)
	}
	// The reader goroutine owns tail until done is closed; the loop below reads it only
	// after waitErr, which is sent after done. compiled is read while it is written.
	var compiled atomic.Int64
	tail := newTail(40)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			tail.add(line)
			// `go build -v` prints one import path per compiled package; anything else
			// (a path with spaces, "#" headers) is diagnostics.
			if !strings.ContainsAny(line, " \t#:") {
				compiled.Add(1)
			}
		}
	}()
	ticker := time.NewTicker(15 * time.Second)
	defer ticker.Stop()
	waitErr := make(chan error, 1)
	go func() { <-done; waitErr <- cmd.Wait() }()
	for {
		select {
		case err := <-waitErr:
			if err != nil {
				if ctx.Err() != nil {
					return fmt.Errorf("kubebin: build interrupted: %w", ctx.Err())
				}
				return fmt.Errorf("kubebin: go build in %s failed after %s: %v\n%s\n"+
					"check that the Go module proxy is reachable (GOPROXY) and that the machine has ~3 GB of free memory",
					tools, time.Since(start).Round(time.Second), err, tail.String())
			}
			if err := install(tmp, bin); err != nil {
				return err
			}
			fmt.Fprintf(progress, "built %d packages in %s; binaries cached in %s\n", compiled.Load(), time.Since(start).Round(time.Second), bin)
			return nil
		case <-ticker.C:
			n := compiled.Load()
			// "At most": go list -deps counts every package, but go build -v names only
			// those it compiles, not those already in Go's build cache.
			if total > 0 {
				fmt.Fprintf(progress, "  compiling: %d of at most %d packages (%d%%), %s elapsed\n", n, total, min(100, int(n*100/int64(total))), time.Since(start).Round(time.Second))
			} else {
				fmt.Fprintf(progress, "  compiling: %d packages, %s elapsed\n", n, time.Since(start).Round(time.Second))
			}
		}
	}
}

// install moves the freshly built binaries into bin, replacing a partial earlier cache.
// It runs under the build lock. The rename is atomic (tmp is made beside bin, on the same
// file system), so the new cache appears complete at once; while the old one is being
// removed a lookup may find binaries missing, and Ensure then waits for the lock.
func install(tmp, bin string) error {
	for _, name := range All {
		if _, err := os.Stat(filepath.Join(tmp, name)); err != nil {
			return fmt.Errorf("kubebin: go build succeeded but produced no %s: %w", name, err)
		}
	}
	if err := os.RemoveAll(bin); err != nil {
		return fmt.Errorf("kubebin: clear old cache: %w", err)
	}
	if err := os.Rename(tmp, bin); err != nil {
		return fmt.Errorf("kubebin: install binaries: %w", err)
	}
	return nil
}

// countDeps returns how many packages the build involves, for the progress line; 0 when it
// cannot tell (progress then shows counts without a percentage).
func countDeps(ctx context.Context, gocmd, dir string, pkgs []string) int {
	cmd := exec.CommandContext(ctx, gocmd, append([]string{"list", "-deps", "-f", "{{.ImportPath}}"}, pkgs...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	out, err := cmd.Output()
	if err != nil {
		return 0
	}
	return bytes.Count(out, []byte("\n"))
}

// checkToolsVersions makes sure the tools module pins the versions this package names, so
// that the cache key never describes binaries of another version.
func checkToolsVersions(dir string) error {
	data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return fmt.Errorf("kubebin: read tools module: %w", err)
	}
	for _, want := range []string{"k8s.io/kubernetes " + KubernetesVersion, "go.etcd.io/etcd/server/v3 " + EtcdVersion} {
		if !bytes.Contains(data, []byte(want)) {
			return fmt.Errorf("kubebin: %s/go.mod does not require %s; update kubebin's version constants with it", dir, want)
		}
	}
	return nil
}

// tail keeps the last n lines written to it, for error messages. It is not safe for
// concurrent use; build hands it from the reader goroutine to the caller through done.
type tail struct {
	n     int
	lines []string
}

func newTail(n int) *tail { return &tail{n: n} }

func (t *tail) add(line string) {
	t.lines = append(t.lines, line)
	if len(t.lines) > t.n {
		t.lines = t.lines[len(t.lines)-t.n:]
	}
}

func (t *tail) String() string { return strings.Join(t.lines, "\n") }
