package eastwest

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// relayPair returns a client connection relayed (both halves of relay) to a server
// connection, loopback TCP on both legs as in the gateway.
func relayPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l1, _ := net.Listen("tcp", "127.0.0.1:0")
	l2, _ := net.Listen("tcp", "127.0.0.1:0")
	defer l1.Close()
	defer l2.Close()
	var wait sync.WaitGroup
	wait.Add(2)
	go func() {
		down, err := l1.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", l2.Addr().String())
		if err != nil {
			down.Close()
			return
		}
		var l link
		go func() { relay(up, down, &l); wait.Done() }()
		go func() { relay(down, up, &l); wait.Done() }()
		go func() { wait.Wait(); up.Close(); down.Close() }() // relay's contract
	}()
	client, err := net.Dial("tcp", l1.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = l2.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestRelayBulkSplicesAndSmallCopies moves small messages, then bulk (which must go
// through a pipe), then small messages again, and checks every byte, the half-close and
// that no pipe stays out of the pool once the connection is idle.
func TestRelayBulkSplicesAndSmallCopies(t *testing.T) {
	client, server := relayPair(t)
	out0, taken0 := pipes.out.Load(), pipes.taken.Load()
	echo := func(msg string) {
		t.Helper()
		client.Write([]byte(msg))
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(server, buf); err != nil || string(buf) != msg {
			t.Fatalf("small message: got %q, %v", buf, err)
		}
	}
	echo("hello")
	if pipes.taken.Load() != taken0 {
		t.Error("a 5-byte message took a pipe; small messages are copied")
	}
	bulk := make([]byte, 8<<20)
	rand.Read(bulk)
	go client.Write(bulk)
	h := sha256.New()
	if _, err := io.CopyN(h, server, int64(len(bulk))); err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(bulk); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("bulk data changed in the relay")
	}
	if pipes.taken.Load() == taken0 {
		t.Error("8 MiB went through without a pipe; bulk must be spliced")
	}
	echo("after bulk")
	deadline := time.Now().Add(5 * time.Second)
	for pipes.out.Load() != out0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d pipes still out of the pool on an idle connection", pipes.out.Load()-out0)
		}
		time.Sleep(time.Millisecond)
	}
	// A half-close reaches the server, which can still answer.
	client.(*net.TCPConn).CloseWrite()
	if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the client's CloseWrite the server read %d, %v; want EOF", n, err)
	}
	server.Write([]byte("bye"))
	server.Close()
	got, _ := io.ReadAll(client)
	if string(got) != "bye" {
		t.Fatalf("after the half-close the client got %q", got)
	}
}

// TestGatewayIdleConnectionsHoldTwoDescriptors holds connections open through a gateway
// after each moved bulk, and counts the process's descriptors: the test's client and
// backend sockets plus the gateway's two per connection, no pipe.
func TestGatewayIdleConnectionsHoldTwoDescriptors(t *testing.T) {
	hello := clientHello(t, testSNI)
	backend, _ := net.Listen("tcp", "127.0.0.1:0")
	defer backend.Close()
	accepted := make(chan net.Conn, 100)
	go func() {
		for {
			c, err := backend.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	routes := &Table{}
	routes.Update(map[string][]netip.AddrPort{"outbound|8080||echo.demo.svc.cluster.local": {netip.MustParseAddrPort(backend.Addr().String())}})
	gw, err := New(Config{Routes: routes, Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go gw.Serve(l)
	defer gw.Shutdown(t.Context())
	fds := func() int {
		t.Helper()
		d, err := openFDs()
		if err != nil {
			t.Skipf("cannot count descriptors: %v", err)
		}
		return d
	}
	const n = 20
	bulk := make([]byte, 1<<20)
	before := fds()
	var conns []net.Conn
	for range n {
		c, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.Write(hello)
		go c.Write(bulk)
		s := <-accepted
		conns = append(conns, s)
		if _, err := io.CopyN(io.Discard, s, int64(len(hello)+len(bulk))); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		// the test's 2 sockets and the gateway's 2 per connection; pooled pipes are free
		// and shared, at most maxFreePipes of them. A few descriptors of earlier tests
		// may close meanwhile, so at most 4 per connection (a pipe per direction held
		// would make it 8).
		got := fds() - before - 2*pipes.freeLen()
		if got <= 4*n && pipes.out.Load() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d idle connections hold %d descriptors besides the pool's, %d pipes out; want at most %d and 0", n, got, pipes.out.Load(), 4*n)
		}
		time.Sleep(time.Millisecond)
	}
}

// openFDs counts this process's open descriptors.
func openFDs() (int, error) {
	d, err := os.ReadDir("/proc/self/fd")
	return len(d) - 1, err // minus the directory being read
}

// freeLen is the number of pipes in the pool.
func (pp *pipePool) freeLen() int {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	return len(pp.free)
}
