package imports

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

const module = "github.com/isthmus-mesh/isthmus"

type pkg struct {
	ImportPath string
	Standard   bool
	Imports    []string
	Deps       []string
}

// listPackages runs `go list` over the whole module and returns its packages with their
// direct imports and transitive dependencies.
func listPackages(t *testing.T) map[string]pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-json=ImportPath,Imports,Deps,Standard", module+"/...")
	cmd.Dir = "../.."
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	pkgs := map[string]pkg{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("decode go list output: %v", err)
		}
		pkgs[p.ImportPath] = p
	}
	if len(pkgs) < 8 {
		t.Fatalf("go list found only %d packages; is the module layout intact?", len(pkgs))
	}
	return pkgs
}

func isStd(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".")
}

func TestImportRules(t *testing.T) {
	pkgs := listPackages(t)
	rules := []struct {
		name     string
		from     string // package path below the module
		forbid   func(dep string) bool
		transit  bool // check transitive dependencies, not just direct imports
		describe string
	}{
		{"mesh is a stdlib-only leaf", "mesh", func(d string) bool { return !isStd(d) }, true,
			"mesh may import only the standard library"},
		{"eastwest has no client-go", "eastwest", func(d string) bool { return strings.HasPrefix(d, "k8s.io/client-go") }, true,
			"eastwest learns routes over xDS, never from Kubernetes"},
		{"eastwest has no local-cluster plumbing", "eastwest", func(d string) bool {
			for _, p := range []string{"netlab", "proc", "kubebin"} {
				if d == module+"/internal/"+p || strings.HasPrefix(d, module+"/internal/"+p+"/") {
					return true
				}
			}
			return false
		}, true, "eastwest is a data-plane process: network namespaces, child processes and cluster binaries belong to tests and scenarios"},
		{"primary has no trust and no cert-manager", "primary", func(d string) bool {
			return d == module+"/trust" || strings.HasPrefix(d, module+"/trust/") || strings.HasPrefix(d, "github.com/cert-manager/")
		}, true, "primary shares only wire names with trust, and those live in mesh; the CA plugs into primary, not the other way round"},
		{"primary does not reach up", "primary", func(d string) bool {
			return strings.HasPrefix(d, module+"/deploy") || strings.HasPrefix(d, module+"/scenarios")
		}, true, "primary must not import deploy or scenarios"},
		{"trust does not import primary", "trust", func(d string) bool { return strings.HasPrefix(d, module+"/primary") }, true,
			"primary plugs the CA in, not the other way round"},
		{"federation does not import primary", "federation", func(d string) bool { return strings.HasPrefix(d, module+"/primary") }, true,
			"imports leave federation through its ImportSink; cmd adapts the primary's registry to it"},
		{"proc is stdlib-only plumbing", "internal/proc", func(d string) bool { return !isStd(d) }, true,
			"internal/proc starts processes with the standard library alone"},
	}
	for _, r := range rules {
		t.Run(r.name, func(t *testing.T) {
			p, ok := pkgs[module+"/"+r.from]
			if !ok {
				t.Fatalf("package %s not found", r.from)
			}
			deps := p.Imports
			if r.transit {
				deps = p.Deps
			}
			for _, d := range deps {
				if r.forbid(d) {
					t.Errorf("%s depends on %s: %s", r.from, d, r.describe)
				}
			}
		})
	}
	t.Run("nothing imports cmd", func(t *testing.T) {
		for path, p := range pkgs {
			for _, imp := range p.Imports {
				if strings.HasPrefix(imp, module+"/cmd") {
					t.Errorf("%s imports %s", path, imp)
				}
			}
		}
	})
	t.Run("every package has a doc.go", func(t *testing.T) {
		for path := range pkgs {
			rel := strings.TrimPrefix(strings.TrimPrefix(path, module), "/")
			if rel == "" {
				continue
			}
			out, err := exec.Command("go", "list", "-f", "{{.Dir}}", path).Output()
			if err != nil {
				t.Fatalf("go list %s: %v", path, err)
			}
			dir := strings.TrimSpace(string(out))
			if _, err := os.Stat(filepath.Join(dir, "doc.go")); err != nil {
				t.Errorf("%s has no doc.go", rel)
			}
		}
	})
}
