package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrNotRoot is returned by New when the process cannot create network namespaces.
var ErrNotRoot = errors.New("netlab: creating network namespaces needs root")

// Namespace is one network namespace. Its loopback interface is up and carries the
// addresses added with AddAddr.
type Namespace struct {
	// Name is the namespace's name under /var/run/netns.
	Name string

	// owned namespaces were created by this process and are deleted by Close.
	owned bool

	mu sync.RWMutex
	// fd is an open handle on the namespace, -1 once closed; guarded by mu.
	fd int
}

// New creates a network namespace named isthmus-<prefix>-<pid>-<random> with loopback up,
// after deleting the namespaces of earlier runs whose creator has exited (sweepOrphans).
// It needs root and returns ErrNotRoot without it. Close deletes it.
func New(prefix string) (*Namespace, error) {
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	sweepOrphans()
	b := make([]byte, 3)
	rand.Read(b)
	// The creator's PID in the name lets a later run delete namespaces whose creator died
	// without cleaning up (a test binary killed by a timeout, say).
	name := "isthmus-" + prefix + "-" + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(b)
	if err := ip("netns", "add", name); err != nil {
		return nil, err
	}
	ns := &Namespace{Name: name, fd: -1, owned: true}
	if err := ip("-n", name, "link", "set", "lo", "up"); err != nil {
		ns.Close()
		return nil, err
	}
	fd, err := unix.Open("/var/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlab: open namespace %s: %w", name, err)
	}
	ns.fd = fd
	return ns, nil
}

// Open opens an existing namespace by name (one another process created, say a scenario
// runner that starts this process), without root if the caller may enter it. Close then
// releases the handle and leaves the namespace in place.
func Open(name string) (*Namespace, error) {
	if name == "" || strings.ContainsAny(name, "/") {
		return nil, fmt.Errorf("netlab: %q is not a namespace name", name)
	}
	fd, err := unix.Open("/var/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("netlab: open namespace %s: %w", name, err)
	}
	return &Namespace{Name: name, fd: fd}, nil
}

// AddAddr gives the namespace a local address (a /32 or /128 on its loopback).
func (n *Namespace) AddAddr(a netip.Addr) error {
	bits := 32
	if a.Is6() {
		bits = 128
	}
	return ip("-n", n.Name, "addr", "add", netip.PrefixFrom(a, bits).String(), "dev", "lo")
}

// Do runs fn on an OS thread switched into the namespace. Sockets fn creates belong to
// the namespace for their whole life; goroutines fn starts do not run in it.
func (n *Namespace) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is unlocked only once it is back in its own namespace. If switching
		// back fails it stays locked, and the runtime ends a thread whose locked goroutine
		// exits, so a thread still inside the namespace is never reused.
		self, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- fmt.Errorf("netlab: open own namespace: %w", err)
			return
		}
		defer unix.Close(self)
		n.mu.RLock()
		if n.fd < 0 {
			n.mu.RUnlock()
			errc <- fmt.Errorf("netlab: namespace %s is closed", n.Name)
			return
		}
		err = unix.Setns(n.fd, unix.CLONE_NEWNET)
		n.mu.RUnlock()
		if err != nil {
			errc <- fmt.Errorf("netlab: enter %s: %w", n.Name, err)
			return
		}
		err = fn()
		if serr := unix.Setns(self, unix.CLONE_NEWNET); serr == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Listen opens a TCP listener inside the namespace.
func (n *Namespace) Listen(address string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = net.Listen("tcp", address)
		return err
	})
	return l, err
}

// Dial connects to address from inside the namespace. It fits grpc.WithContextDialer.
func (n *Namespace) Dial(ctx context.Context, address string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", address)
		return err
	})
	return c, err
}

// Close deletes a namespace New created (sockets still open in it keep it alive until they
// close); for one Open found, it only releases the handle.
func (n *Namespace) Close() error {
	n.mu.Lock()
	if n.fd >= 0 {
		unix.Close(n.fd)
		n.fd = -1
	}
	n.mu.Unlock()
	if !n.owned {
		return nil
	}
	return ip("netns", "del", n.Name)
}

func ip(args ...string) error {
	cmd := exec.Command("ip", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("netlab: ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// Link connects two namespaces with a veth pair, giving a the address addrA and b the
// address addrB (prefixes, so the connected route is installed on each side).
func Link(a, b *Namespace, addrA, addrB netip.Prefix) error {
	b2 := make([]byte, 3)
	rand.Read(b2)
	suffix := hex.EncodeToString(b2)
	ifA, ifB := "vA"+suffix, "vB"+suffix
	steps := [][]string{
		{"link", "add", ifA, "netns", a.Name, "type", "veth", "peer", "name", ifB, "netns", b.Name},
		{"-n", a.Name, "addr", "add", addrA.String(), "dev", ifA},
		{"-n", b.Name, "addr", "add", addrB.String(), "dev", ifB},
		{"-n", a.Name, "link", "set", ifA, "up"},
		{"-n", b.Name, "link", "set", ifB, "up"},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return err
		}
	}
	return nil
}

// Route adds a route in the namespace: dst via gateway.
func (n *Namespace) Route(dst netip.Prefix, via netip.Addr) error {
	return ip("-n", n.Name, "route", "add", dst.String(), "via", via.String())
}

// NoForwarding turns IP forwarding off in the namespace, so that it never routes between
// its interfaces: only processes inside it can carry traffic across.
func (n *Namespace) NoForwarding() error {
	return n.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0"), 0o644)
	})
}

// sweepOrphans deletes isthmus-* namespaces whose creating process no longer exists, read
// from the PID in the name. A namespace whose creator's PID has been reused by another
// process survives until that process is gone too: a leak for a while, never a namespace
// deleted under a live creator. Failures are ignored; the sweep is best effort.
func sweepOrphans() {
	entries, err := os.ReadDir("/var/run/netns")
	if err != nil {
		return
	}
	for _, e := range entries {
		parts := strings.Split(e.Name(), "-")
		if len(parts) < 4 || parts[0] != "isthmus" {
			continue
		}
		pid, err := strconv.Atoi(parts[len(parts)-2])
		if err != nil || pid <= 0 {
			continue
		}
		if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
			continue // its creator is alive
		}
		_ = ip("netns", "del", e.Name())
	}
}
