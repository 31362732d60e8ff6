package uplinkguard

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// Comment prefixes the comment of every rule this package inserts. Each Guard adds its own
// suffix (process and sequence), so guards in several processes never remove each other's
// rules: duplicate reject rules are harmless, a rule removed under another user is not.
const Comment = "isthmus-uplinkguard"

// Chains are the chains a rule is inserted into: FORWARD for everything the host routes,
// and DOCKER-USER, which docker jumps to before its own accept rules (docker puts its
// jumps above FORWARD's other rules when it starts, so FORWARD alone is not enough).
var Chains = []string{"FORWARD", "DOCKER-USER"}

// Guard is the set of reject rules for one host. Its zero value is not usable: call New.
type Guard struct {
	// Uplinks are the interfaces of the host's default routes (IPv4 and IPv6).
	Uplinks []string

	mu       sync.Mutex
	comment  string   // Comment plus this guard's suffix
	tools    []string // iptables, and ip6tables when it works
	inserted []rule   // rules this guard added, in order
}

type rule struct {
	tool, chain, uplink, comment string
}

func (r rule) spec() []string {
	return []string{"-o", r.uplink, "-m", "comment", "--comment", r.comment, "-j", "REJECT"}
}

var seq atomic.Int64

// New finds the uplinks and the iptables tools. It fails when there is no default route
// (nothing to guard is also nothing this package can vouch for) or no iptables.
func New() (*Guard, error) {
	up4, err := defaultRouteInterfaces("/proc/net/route", parseRoute4)
	if err != nil {
		return nil, err
	}
	up6, _ := defaultRouteInterfaces("/proc/net/ipv6_route", parseRoute6) // no IPv6 is fine
	uplinks := slices.Compact(slices.Sorted(slices.Values(append(up4, up6...))))
	if len(uplinks) == 0 {
		return nil, errors.New("uplinkguard: the host has no default route; refusing to guess which interface leads off the machine")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return nil, errors.New("uplinkguard: iptables is not installed (apt-get install iptables); container networks are not created without the uplink rule")
	}
	g := &Guard{Uplinks: uplinks, tools: []string{"iptables"}, comment: fmt.Sprintf("%s:%d-%d", Comment, os.Getpid(), seq.Add(1))}
	if len(up6) > 0 {
		// IPv6 leaves the machine too: its rules are required, not best effort.
		if _, err := exec.LookPath("ip6tables"); err != nil {
			return nil, fmt.Errorf("uplinkguard: the host has an IPv6 default route via %v but no ip6tables (apt-get install iptables)", up6)
		}
		if out, err := exec.Command("ip6tables", "-w", "-S", "FORWARD").CombinedOutput(); err != nil {
			return nil, fmt.Errorf("uplinkguard: ip6tables does not work (%s) but the host routes IPv6 via %v", strings.TrimSpace(string(out)), up6)
		}
		g.tools = append(g.tools, "ip6tables")
	}
	return g, nil
}

// Install inserts the reject rule for every uplink at the top of every chain in Chains,
// creating DOCKER-USER when it does not exist, then checks them. It is idempotent: a
// second call adds nothing.
func (g *Guard) Install() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, tool := range g.tools {
		for _, chain := range Chains {
			if !chainExists(tool, chain) {
				if out, err := exec.Command(tool, "-w", "-N", chain).CombinedOutput(); err != nil && !chainExists(tool, chain) {
					return fmt.Errorf("uplinkguard: %s -N %s: %v: %s", tool, chain, err, strings.TrimSpace(string(out)))
				}
			}
			for _, up := range g.Uplinks {
				r := rule{tool, chain, up, g.comment}
				if present(r) {
					continue
				}
				args := append([]string{"-w", "-I", chain, "1"}, r.spec()...)
				if out, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
					return fmt.Errorf("uplinkguard: %s %s: %v: %s", tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
				}
				g.inserted = append(g.inserted, r)
			}
		}
	}
	return g.check()
}

// Check returns nil only when every reject rule is in place, and otherwise an error naming
// the first one missing. Call it right before creating a container network.
func (g *Guard) Check() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.check()
}

func (g *Guard) check() error {
	for _, tool := range g.tools {
		for _, chain := range Chains {
			for _, up := range g.Uplinks {
				if !present(rule{tool, chain, up, g.comment}) {
					return fmt.Errorf("uplinkguard: %s chain %s has no rule rejecting forwarded traffic out of %s: container traffic could leave the machine; run Install first", tool, chain, up)
				}
			}
		}
	}
	// The rule must also come before any ACCEPT in FORWARD: docker re-inserts its jumps at
	// the top when it starts, which is why DOCKER-USER carries the rule too; in FORWARD we
	// only need the rule to be ahead of a blanket ACCEPT.
	for _, tool := range g.tools {
		out, err := exec.Command(tool, "-w", "-S", "FORWARD").Output()
		if err != nil {
			return fmt.Errorf("uplinkguard: %s -S FORWARD: %w", tool, err)
		}
		if err := rejectBeforeAccept(string(out)); err != nil {
			return fmt.Errorf("uplinkguard: %s FORWARD: %w", tool, err)
		}
	}
	return nil
}

// Remove deletes the rules this guard inserted (not the DOCKER-USER chain, which docker
// owns once it runs). It returns the first error and still tries every rule.
func (g *Guard) Remove() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	var first error
	for i := len(g.inserted) - 1; i >= 0; i-- {
		r := g.inserted[i]
		args := append([]string{"-w", "-D", r.chain}, r.spec()...)
		if out, err := exec.Command(r.tool, args...).CombinedOutput(); err != nil && first == nil {
			first = fmt.Errorf("uplinkguard: %s %s: %v: %s", r.tool, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	g.inserted = nil
	return first
}

func chainExists(tool, chain string) bool {
	return exec.Command(tool, "-w", "-S", chain).Run() == nil
}

func present(r rule) bool {
	args := append([]string{"-w", "-C", r.chain}, r.spec()...)
	return exec.Command(r.tool, args...).Run() == nil
}

// rejectBeforeAccept checks that, in `iptables -S FORWARD` output, no unconditional
// ACCEPT rule comes before the first of this package's reject rules.
func rejectBeforeAccept(s string) error {
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "-A FORWARD") {
			continue
		}
		if strings.Contains(line, Comment) {
			return nil
		}
		if line == "-A FORWARD -j ACCEPT" {
			return errors.New("an unconditional ACCEPT comes before the uplink reject rule")
		}
	}
	return nil
}

// defaultRouteInterfaces returns the interfaces of the default routes in a /proc route table.
func defaultRouteInterfaces(path string, parse func(fields []string) (string, bool)) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("uplinkguard: read %s: %w", path, err)
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if ifc, ok := parse(strings.Fields(sc.Text())); ok && !slices.Contains(out, ifc) {
			out = append(out, ifc)
		}
	}
	return out, nil
}

// parseRoute4 reads a /proc/net/route line: Iface Destination Gateway Flags ... Mask.
func parseRoute4(f []string) (string, bool) {
	if len(f) < 8 || f[0] == "Iface" {
		return "", false
	}
	// destination 0 and mask 0: a default route; its flags must have RTF_UP (0x1).
	return f[0], f[1] == "00000000" && f[7] == "00000000" && flagUp(f[3])
}

func flagUp(hex string) bool {
	var v uint64
	_, err := fmt.Sscanf(hex, "%x", &v)
	return err == nil && v&1 == 1
}

// parseRoute6 reads a /proc/net/ipv6_route line: dst dstlen src srclen nexthop metric refcnt
// use flags iface. A default route has dst ::/0; the loopback "unreachable" default
// (iface lo) is not an uplink.
func parseRoute6(f []string) (string, bool) {
	if len(f) < 10 {
		return "", false
	}
	if f[0] != strings.Repeat("0", 32) || f[1] != "00" || f[9] == "lo" {
		return "", false
	}
	return f[9], flagUp(f[8])
}
