package engine

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// realRuncEnv names the variable that turns this executable into the runc wrapper; its
// value is the real runc's path.
const realRuncEnv = "ISTHMUS_RUNC_REAL"

// capSysResource is the capability the wrapper removes.
const capSysResource = "CAP_SYS_RESOURCE"

func init() {
	real := os.Getenv(realRuncEnv)
	if real == "" {
		return
	}
	if err := rewriteSpecs(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "isthmus runc wrapper: %v\n", err)
		os.Exit(1)
	}
	os.Unsetenv(realRuncEnv)
	err := syscall.Exec(real, append([]string{real}, os.Args[1:]...), os.Environ())
	fmt.Fprintf(os.Stderr, "isthmus runc wrapper: exec %s: %v\n", real, err)
	os.Exit(1)
}

// rewriteSpecs finds the OCI documents a runc command line names and removes
// CAP_SYS_RESOURCE from them: the bundle's config.json for create and run, the process
// file for exec. Other commands (state, kill, delete, ...) pass through untouched.
func rewriteSpecs(args []string) error {
	cmd, rest := subcommand(args)
	switch cmd {
	case "create", "run":
		bundle := flagValue(rest, "bundle", "b")
		if bundle == "" {
			bundle = "."
		}
		return rewriteFile(filepath.Join(bundle, "config.json"), true)
	case "exec":
		if p := flagValue(rest, "process", "p"); p != "" {
			return rewriteFile(p, false)
		}
	}
	return nil
}

// subcommand skips runc's global flags (all of which take a value except the boolean
// ones listed) and returns the subcommand and what follows it.
func subcommand(args []string) (string, []string) {
	boolean := []string{"--debug", "--systemd-cgroup", "--rootless", "--help", "-h", "--version", "-v"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if len(a) == 0 || a[0] != '-' {
			return a, args[i+1:]
		}
		if slices.Contains(boolean, a) || strings.Contains(a, "=") {
			continue
		}
		i++ // the flag's value
	}
	return "", nil
}

// flagValue returns the value of --long/-short in args (as "--long V", "--long=V", "-s V").
func flagValue(args []string, long, short string) string {
	for i, a := range args {
		for _, f := range []string{"--" + long, "-" + long, "-" + short} {
			if a == f && i+1 < len(args) {
				return args[i+1]
			}
			if len(a) > len(f) && a[:len(f)+1] == f+"=" {
				return a[len(f)+1:]
			}
		}
	}
	return ""
}

// rewriteFile removes the capability from an OCI config (spec=true: under "process") or
// process document, keeping every other field as it was.
func rewriteFile(path string, spec bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	out, changed, err := dropCapability(b, spec)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if !changed {
		return nil
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	tmp := path + ".isthmus-tmp"
	if err := os.WriteFile(tmp, out, st.Mode().Perm()); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// dropCapability edits the JSON document b. It decodes only what it changes, so fields it
// does not know survive byte for byte in meaning.
func dropCapability(b []byte, spec bool) ([]byte, bool, error) {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, false, fmt.Errorf("not an OCI document: %w", err)
	}
	process := doc
	if spec {
		raw, ok := doc["process"]
		if !ok {
			return b, false, nil
		}
		if err := json.Unmarshal(raw, &process); err != nil {
			return nil, false, fmt.Errorf("process: %w", err)
		}
	}
	raw, ok := process["capabilities"]
	if !ok {
		return b, false, nil
	}
	var caps map[string][]string
	if err := json.Unmarshal(raw, &caps); err != nil {
		return nil, false, fmt.Errorf("capabilities: %w", err)
	}
	changed := false
	for set, list := range caps {
		kept := slices.DeleteFunc(slices.Clone(list), func(c string) bool { return c == capSysResource })
		if len(kept) != len(list) {
			caps[set], changed = kept, true
		}
	}
	if !changed {
		return b, false, nil
	}
	nc, err := json.Marshal(caps)
	if err != nil {
		return nil, false, err
	}
	process["capabilities"] = nc
	if spec {
		np, err := json.Marshal(process)
		if err != nil {
			return nil, false, err
		}
		doc["process"] = np
	}
	out, err := json.Marshal(doc)
	return out, true, err
}

// boundingSetHas reports whether capability number c is in this process's bounding set.
func boundingSetHas(c uint) (bool, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false, err
	}
	var bnd uint64
	for _, line := range strings.Split(string(b), "\n") {
		if n, _ := fmt.Sscanf(line, "CapBnd:\t%x", &bnd); n == 1 {
			return bnd&(1<<c) != 0, nil
		}
	}
	return false, fmt.Errorf("/proc/self/status has no CapBnd line")
}
