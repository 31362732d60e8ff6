package engine

import (
	"os"
	"os/exec"
	"slices"
	"strings"
)

// hostState is what dockerd changes in the host's network configuration and does not put
// back when it stops: IPv4 forwarding (it turns it on), the FORWARD policy (it sets DROP),
// its chains and the rules jumping to them. A started engine records it before dockerd
// starts and restores it after dockerd stops, so the host is left as it was.
type hostState struct {
	ipForward string              // contents of /proc/sys/net/ipv4/ip_forward
	policy    string              // FORWARD's policy
	rules     map[string][]string // table → `iptables -S` lines before the start
}

const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

// dockerChains are the chains dockerd creates (DOCKER-USER is the guard's, kept).
var dockerChains = map[string][]string{
	"filter": {"DOCKER", "DOCKER-ISOLATION-STAGE-1", "DOCKER-ISOLATION-STAGE-2"},
	"nat":    {"DOCKER"},
}

func recordHost() (*hostState, error) {
	b, err := os.ReadFile(ipForwardPath)
	if err != nil {
		return nil, err
	}
	h := &hostState{ipForward: strings.TrimSpace(string(b)), policy: "ACCEPT", rules: map[string][]string{}}
	for table := range dockerChains {
		out, err := exec.Command("iptables", "-w", "-t", table, "-S").Output()
		if err != nil {
			return nil, err
		}
		h.rules[table] = strings.Split(strings.TrimSpace(string(out)), "\n")
	}
	for _, l := range h.rules["filter"] {
		if p, ok := strings.CutPrefix(l, "-P FORWARD "); ok {
			h.policy = p
		}
	}
	return h, nil
}

// restore deletes what dockerd added (rules in built-in chains that were not there before,
// then its chains if they were new) and puts the policy and forwarding back. It tries
// everything and returns the first error.
func (h *hostState) restore() error {
	var first error
	run := func(args ...string) {
		if out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput(); err != nil && first == nil {
			first = &cmdError{args, strings.TrimSpace(string(out)), err}
		}
	}
	for table, chains := range dockerChains {
		out, err := exec.Command("iptables", "-w", "-t", table, "-S").Output()
		if err != nil {
			return err
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if !strings.HasPrefix(l, "-A ") || slices.Contains(h.rules[table], l) {
				continue
			}
			f := strings.Fields(l)
			if l == "-A DOCKER-USER -j RETURN" { // dockerd fills the guard's chain with this
				run("-t", table, "-D", "DOCKER-USER", "-j", "RETURN")
				continue
			}
			if len(f) < 2 || slices.Contains(chains, f[1]) { // inside docker's chains: go with the chain
				continue
			}
			if !jumpsToDocker(f) {
				continue // not dockerd's (another process's rule): leave it
			}
			f[0] = "-D"
			run(append([]string{"-t", table}, unquote(f)...)...)
		}
		for _, c := range chains {
			if slices.Contains(h.rules[table], "-N "+c) {
				continue
			}
			run("-t", table, "-F", c)
			run("-t", table, "-X", c)
		}
	}
	run("-P", "FORWARD", h.policy)
	if err := os.WriteFile(ipForwardPath, []byte(h.ipForward+"\n"), 0o644); err != nil && first == nil {
		first = err
	}
	return first
}

func jumpsToDocker(f []string) bool {
	for i, w := range f {
		if (w == "-j" || w == "-g") && i+1 < len(f) && strings.HasPrefix(f[i+1], "DOCKER") {
			return true
		}
	}
	return false
}

// unquote removes the quotes iptables -S puts around comments, so the words can be
// passed back as arguments.
func unquote(f []string) []string {
	out := make([]string, 0, len(f))
	for i := 0; i < len(f); i++ {
		w := f[i]
		if strings.HasPrefix(w, `"`) {
			parts := []string{strings.TrimPrefix(w, `"`)}
			for !strings.HasSuffix(parts[len(parts)-1], `"`) && i+1 < len(f) {
				i++
				parts = append(parts, f[i])
			}
			w = strings.TrimSuffix(strings.Join(parts, " "), `"`)
		}
		out = append(out, w)
	}
	return out
}

type cmdError struct {
	args []string
	out  string
	err  error
}

func (e *cmdError) Error() string {
	return "iptables " + strings.Join(e.args, " ") + ": " + e.err.Error() + ": " + e.out
}
