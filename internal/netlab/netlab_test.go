package netlab

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestNamespaceIsolatesAddresses(t *testing.T) {
	ns, err := New("t")
	if errors.Is(err, ErrNotRoot) {
		t.Skip("needs root to create network namespaces (CI runs as root)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := ns.Close(); err != nil {
			t.Error(err)
		}
		if out, _ := exec.Command("ip", "netns", "list").Output(); strings.Contains(string(out), ns.Name) {
			t.Errorf("namespace %s left after Close", ns.Name)
		}
	}()
	addr := netip.MustParseAddr("10.123.0.1")
	if err := ns.AddAddr(addr); err != nil {
		t.Fatal(err)
	}
	l, err := ns.Listen("10.123.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("hello from inside"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(c)
	c.Close()
	if string(got) != "hello from inside" {
		t.Fatalf("read %q", got)
	}
	// The host's own namespace does not have the address.
	out, _ := exec.Command("ip", "-o", "addr").Output()
	if strings.Contains(string(out), "10.123.0.1") {
		t.Fatal("the namespace address leaked into the host namespace")
	}
}

func TestOrphanedNamespacesAreSwept(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces (CI runs as root)")
	}
	// A PID that is not running stands for a test binary that died without cleaning up.
	dead := 4000000
	for ; dead > 1; dead-- {
		if _, err := os.Stat("/proc/" + strconv.Itoa(dead)); err != nil {
			break
		}
	}
	orphan := "isthmus-t-" + strconv.Itoa(dead) + "-abcdef"
	if err := ip("netns", "add", orphan); err != nil {
		t.Fatal(err)
	}
	ns, err := New("t")
	if err != nil {
		ip("netns", "del", orphan)
		t.Fatal(err)
	}
	defer ns.Close()
	if _, err := os.Stat("/var/run/netns/" + orphan); err == nil {
		ip("netns", "del", orphan)
		t.Fatal("an orphaned namespace survived New")
	}
}

func TestOpenSharesAndLeavesTheNamespace(t *testing.T) {
	ns, err := New("o")
	if errors.Is(err, ErrNotRoot) {
		t.Skip("needs root to create network namespaces (CI runs as root)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := ns.AddAddr(netip.MustParseAddr("10.124.0.1")); err != nil {
		t.Fatal(err)
	}
	opened, err := Open(ns.Name)
	if err != nil {
		t.Fatal(err)
	}
	l, err := opened.Listen("10.124.0.1:0")
	if err != nil {
		t.Fatalf("listen through the opened handle: %v", err)
	}
	defer l.Close()
	c, err := ns.Dial(context.Background(), l.Addr().String())
	if err != nil {
		t.Fatalf("the creator's handle does not reach the opened handle's listener: %v", err)
	}
	c.Close()
	if err := opened.Close(); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "list").Output(); !strings.Contains(string(out), ns.Name) {
		t.Fatal("closing an opened handle deleted the namespace")
	}
	if _, err := Open("no-such-namespace-" + strconv.Itoa(os.Getpid())); err == nil {
		t.Fatal("opened a namespace that does not exist")
	}
	if _, err := Open("../etc"); err == nil {
		t.Fatal("accepted a path as a namespace name")
	}
}
