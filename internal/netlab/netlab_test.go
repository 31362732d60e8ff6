package netlab

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"os/exec"
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
