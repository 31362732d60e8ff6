package scenarios

import (
	"embed"
	"fmt"
	"path"
	"slices"
	"strings"
)

// The built-in topologies are these files, embedded: `isthmus scenario show` prints them
// as they are, comments included, and the Go constructors below parse them.
//
//go:embed topologies/*.yaml
var builtinFiles embed.FS

// Builtins returns the names of the built-in scenarios, sorted.
func Builtins() []string {
	entries, err := builtinFiles.ReadDir("topologies")
	if err != nil {
		return nil
	}
	var names []string
	for _, e := range entries {
		names = append(names, strings.TrimSuffix(e.Name(), ".yaml"))
	}
	slices.Sort(names)
	return names
}

// BuiltinSource returns the YAML of the built-in scenario name.
func BuiltinSource(name string) ([]byte, error) {
	data, err := builtinFiles.ReadFile(path.Join("topologies", name+".yaml"))
	if err != nil {
		return nil, fmt.Errorf("scenarios: no built-in scenario %q (have %s)", name, strings.Join(Builtins(), ", "))
	}
	return data, nil
}

// Builtin returns the built-in scenario name, parsed and validated.
func Builtin(name string) (*Topology, error) {
	data, err := BuiltinSource(name)
	if err != nil {
		return nil, err
	}
	t, err := Parse(data)
	if err != nil {
		return nil, err
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return t, nil
}

// SingleCluster is one cluster with its own primary.
func SingleCluster() (*Topology, error) { return Builtin("single-cluster") }

// MultiPrimary is two clusters on one network, each with a primary that discovers the
// other's endpoints.
func MultiPrimary() (*Topology, error) { return Builtin("multi-primary") }

// MultiNetwork is two clusters on two networks with an east-west gateway each.
func MultiNetwork() (*Topology, error) { return Builtin("multi-network") }
