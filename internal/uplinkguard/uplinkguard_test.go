package uplinkguard

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestDefaultRoutes(t *testing.T) {
	dir := t.TempDir()
	v4 := filepath.Join(dir, "route")
	os.WriteFile(v4, []byte("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"+
		"eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"+
		"eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"+
		"wlan0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"+ // not up
		"eth1\t00000000\t010300C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"), 0o600)
	got, err := defaultRouteInterfaces(v4, parseRoute4)
	if err != nil || !slices.Equal(got, []string{"eth0", "eth1"}) {
		t.Fatalf("v4 uplinks = %v, %v; want [eth0 eth1]", got, err)
	}
	v6 := filepath.Join(dir, "ipv6_route")
	zero := strings.Repeat("0", 32)
	os.WriteFile(v6, []byte(
		"fd000000000000000000000000000000 40 "+zero+" 00 "+zero+" 00000100 00000001 00000000 00000001     eth0\n"+
			zero+" 00 "+zero+" 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0\n"+
			zero+" 00 "+zero+" 00 "+zero+" ffffffff 00000001 00000000 00200200       lo\n"), 0o600)
	got, err = defaultRouteInterfaces(v6, parseRoute6)
	if err != nil || !slices.Equal(got, []string{"eth0"}) {
		t.Fatalf("v6 uplinks = %v, %v; want [eth0] (lo's unreachable default is not an uplink)", got, err)
	}
	if _, err := defaultRouteInterfaces(filepath.Join(dir, "missing"), parseRoute4); err == nil {
		t.Fatal("a missing route table gave no error")
	}
}

func TestRejectBeforeAccept(t *testing.T) {
	ok := "-P FORWARD ACCEPT\n-A FORWARD -j DOCKER-USER\n-A FORWARD -o eth0 -m comment --comment \"isthmus-uplinkguard:1-1\" -j REJECT --reject-with icmp-port-unreachable\n-A FORWARD -j ACCEPT\n"
	if err := rejectBeforeAccept(ok); err != nil {
		t.Fatal(err)
	}
	bad := "-P FORWARD ACCEPT\n-A FORWARD -j ACCEPT\n-A FORWARD -o eth0 -m comment --comment \"isthmus-uplinkguard:1-1\" -j REJECT\n"
	if err := rejectBeforeAccept(bad); err == nil {
		t.Fatal("an ACCEPT ahead of the reject rule was not reported")
	}
}

// TestInstallCheckRemove changes the host's real FORWARD chain and puts it back.
func TestInstallCheckRemove(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (iptables)")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Skip("iptables is not installed (.ci/run installs it)")
	}
	before := save(t)
	g, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Check(); err == nil {
		t.Fatal("Check passed before Install")
	}
	if err := g.Install(); err != nil {
		t.Fatal(err)
	}
	if err := g.Install(); err != nil { // idempotent
		t.Fatal(err)
	}
	if n := len(g.inserted); n != len(g.tools)*len(Chains)*len(g.Uplinks) {
		t.Fatalf("inserted %d rules, want one per tool, chain and uplink", n)
	}
	// Another guard (as another process would have) adds its own rules; removing it
	// leaves the first guard's in place.
	other, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Install(); err != nil {
		t.Fatal(err)
	}
	if err := other.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := g.Check(); err != nil {
		t.Fatalf("another guard's Remove took this guard's rules: %v", err)
	}
	// Deleting a rule behind the guard's back is seen.
	r := g.inserted[0]
	if out, err := exec.Command(r.tool, append([]string{"-w", "-D", r.chain}, r.spec()...)...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if err := g.Check(); err == nil || !strings.Contains(err.Error(), r.uplink) {
		t.Fatalf("Check after a rule vanished = %v", err)
	}
	g.inserted = g.inserted[1:]
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	after := save(t)
	// DOCKER-USER may have been created; it stays (docker owns it). Everything else is back.
	if strip(after) != strip(before) {
		t.Fatalf("rules after Remove differ:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func save(t *testing.T) string {
	t.Helper()
	var all []string
	for _, tool := range []string{"iptables", "ip6tables"} {
		out, err := exec.Command(tool, "-w", "-S").Output()
		if err != nil {
			continue
		}
		all = append(all, tool+":\n"+string(out))
	}
	return strings.Join(all, "\n")
}

func strip(s string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if l != "-N DOCKER-USER" {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}
