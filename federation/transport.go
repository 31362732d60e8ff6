package federation

import (
	"fmt"
	"log"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// countingTransport is memberlist's own UDP/TCP transport with every byte this member
// sends counted: packets as written, and everything written on the streams it dials or
// accepts (the label header memberlist adds, push/pull state, fallback probes). The
// count feeds isthmus_federation_gossip_sent_bytes_total and the gossip-bytes benchmark.
type countingTransport struct {
	*memberlist.NetTransport
	sent    atomic.Uint64
	onSent  func(int) // adds to the metric; never nil
	streams chan net.Conn
	done    chan struct{}
	stop    sync.Once
}

var _ memberlist.NodeAwareTransport = (*countingTransport)(nil)

// newCountingTransport listens on addr:port (port 0: a free one, retried like
// memberlist does when TCP and UDP cannot both get the port).
func newCountingTransport(addr string, port int, logger *log.Logger, onSent func(int)) (*countingTransport, error) {
	tries := 1
	if port == 0 {
		tries = 10
	}
	var nt *memberlist.NetTransport
	var err error
	for range tries {
		nt, err = memberlist.NewNetTransport(&memberlist.NetTransportConfig{BindAddrs: []string{addr}, BindPort: port, Logger: logger})
		if err == nil || !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("gossip transport: %w", err)
	}
	t := &countingTransport{NetTransport: nt, onSent: onSent, streams: make(chan net.Conn), done: make(chan struct{})}
	go t.relayStreams()
	return t, nil
}

func (t *countingTransport) add(n int) {
	if n > 0 {
		t.sent.Add(uint64(n))
		t.onSent(n)
	}
}

// Sent is the number of bytes sent so far.
func (t *countingTransport) Sent() uint64 { return t.sent.Load() }

func (t *countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	return t.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (t *countingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	at, err := t.NetTransport.WriteToAddress(b, a)
	if err == nil {
		t.add(len(b))
	}
	return at, err
}

func (t *countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t *countingTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	c, err := t.NetTransport.DialAddressTimeout(a, timeout)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, t: t}, nil
}

// StreamCh hands memberlist the accepted streams, wrapped so that its replies count.
func (t *countingTransport) StreamCh() <-chan net.Conn { return t.streams }

func (t *countingTransport) relayStreams() {
	in := t.NetTransport.StreamCh()
	for {
		select {
		case <-t.done:
			return
		case c := <-in:
			select {
			case t.streams <- &countingConn{Conn: c, t: t}:
			case <-t.done:
				_ = c.Close()
				return
			}
		}
	}
}

func (t *countingTransport) Shutdown() error {
	err := t.NetTransport.Shutdown()
	t.stop.Do(func() { close(t.done) })
	return err
}

// countingConn counts what is written on a gossip stream.
type countingConn struct {
	net.Conn
	t *countingTransport
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.t.add(n)
	return n, err
}
