package spirebin

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/internal/buildlock"
)

// Version is the SPIRE release tools/spire pins.
const Version = "v1.13.3"

// Server is the name of the SPIRE server binary.
const Server = "spire-server"

// Options says where the cache is and how to build. The zero value works from inside an
// Isthmus checkout.
type Options struct {
	// CacheDir is the cache root; "" means $ISTHMUS_SPIRE_CACHE, else
	// <os.UserCacheDir()>/isthmus/spire.
	CacheDir string
	// ToolsDir is the tools/spire module; "" means search upward from the working
	// directory.
	ToolsDir string
	// Progress receives build steps; nil discards.
	Progress io.Writer
}

// Path returns where the binary is (or will be) cached.
func (o Options) Path() (string, error) {
	root := o.CacheDir
	if root == "" {
		root = os.Getenv("ISTHMUS_SPIRE_CACHE")
	}
	if root == "" {
		ucd, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("spirebin: no cache directory (set ISTHMUS_SPIRE_CACHE): %w", err)
		}
		root = filepath.Join(ucd, "isthmus", "spire")
	}
	return filepath.Join(root, "spire-"+Version, Server), nil
}

// Lookup returns the cached binary, or an error saying how to build it.
func Lookup(o Options) (string, error) {
	p, err := o.Path()
	if err != nil {
		return "", err
	}
	if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
		return p, nil
	}
	return "", fmt.Errorf("spirebin: %s not found; build it with `cd tools/spire && go build -o %s github.com/spiffe/spire/cmd/spire-server` (about 15 minutes), or let a test call Ensure", p, p)
}

// Ensure returns the binary, building it into the cache first when it is missing. Only one
// process builds at a time; the others wait for it.
func Ensure(ctx context.Context, o Options) (string, error) {
	if p, err := Lookup(o); err == nil {
		return p, nil
	}
	p, err := o.Path()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return "", fmt.Errorf("spirebin: create cache: %w", err)
	}
	unlock, err := buildlock.Acquire(ctx, filepath.Join(filepath.Dir(p), ".build.lock"), "spire-server", o.Progress)
	if err != nil {
		return "", fmt.Errorf("spirebin: %w", err)
	}
	defer unlock()
	if p, err := Lookup(o); err == nil {
		return p, nil
	}
	tools := o.ToolsDir
	if tools == "" {
		if tools, err = findTools(); err != nil {
			return "", err
		}
	}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	fmt.Fprintf(progress, "building spire-server %s into %s (once per version; about 15 minutes)\n", Version, p)
	tmp := p + ".building"
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, "github.com/spiffe/spire/cmd/spire-server")
	cmd.Dir = tools
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=readonly", "CGO_ENABLED=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("spirebin: go build spire-server in %s: %v\n%s", tools, err, out)
	}
	if err := os.Rename(tmp, p); err != nil {
		return "", fmt.Errorf("spirebin: %w", err)
	}
	return p, nil
}

func findTools() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		c := filepath.Join(d, "tools", "spire")
		if _, err := os.Stat(filepath.Join(c, "go.mod")); err == nil {
			return c, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("spirebin: no tools/spire/go.mod in %s or any parent; run from an Isthmus checkout", wd)
		}
	}
}
