package peerbench

import (
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// The routes every relay gets: bulk data goes to a sink, requests to an echo server.
const (
	sinkSNI = "outbound_.8080_._.sink.bench.svc.cluster.local"
	echoSNI = "outbound_.8080_._.echo.bench.svc.cluster.local"
	// msgSize is the request and answer size of the latency and new-connection phases.
	msgSize = 64
	// chunkSize is what the bulk client writes at a time.
	chunkSize = 256 * 1024
)

// clientHello returns the first TLS record crypto/tls sends for serverName: what every
// relay routes on. The handshake never completes (the backends are not TLS servers), so
// the figures are the relays' and not TLS's.
func clientHello(serverName string) ([]byte, error) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		c := tls.Client(a, &tls.Config{ServerName: serverName, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Handshake()
		a.Close()
	}()
	b.SetDeadline(time.Now().Add(2 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(b, hdr); err != nil {
		return nil, fmt.Errorf("peerbench: capture ClientHello: %w", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(b, body); err != nil {
		return nil, fmt.Errorf("peerbench: capture ClientHello: %w", err)
	}
	return append(hdr, body...), nil
}

// backend is the sink and the echo server every relay forwards to, in this process.
type backend struct {
	helloLen  int
	sink      net.Listener
	echo      net.Listener
	received  atomic.Int64 // bytes the sink received after hellos
	echoConns atomic.Int64 // echo connections whose hello arrived and are still open
	wg        sync.WaitGroup
}

// newBackend listens on two loopback ports; each connection first skips the helloLen
// bytes of the hello a relay replays.
func newBackend(helloLen int) (*backend, error) {
	b := &backend{helloLen: helloLen}
	var err error
	if b.sink, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("peerbench: backend: %w", err)
	}
	if b.echo, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		b.sink.Close()
		return nil, fmt.Errorf("peerbench: backend: %w", err)
	}
	b.wg.Add(2)
	go b.serve(b.sink, b.drain)
	go b.serve(b.echo, b.answer)
	return b, nil
}

func (b *backend) routes() map[string]netip.AddrPort {
	return map[string]netip.AddrPort{
		sinkSNI: netip.MustParseAddrPort(b.sink.Addr().String()),
		echoSNI: netip.MustParseAddrPort(b.echo.Addr().String()),
	}
}

func (b *backend) serve(l net.Listener, handle func(net.Conn)) {
	defer b.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			if _, err := io.ReadFull(c, make([]byte, b.helloLen)); err != nil {
				return
			}
			handle(c)
		}()
	}
}

func (b *backend) drain(c net.Conn) {
	buf := make([]byte, chunkSize)
	for {
		n, err := c.Read(buf)
		b.received.Add(int64(n))
		if err != nil {
			return
		}
	}
}

func (b *backend) answer(c net.Conn) {
	b.echoConns.Add(1)
	defer b.echoConns.Add(-1)
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (b *backend) close() {
	b.sink.Close()
	b.echo.Close()
	b.wg.Wait()
}

// window is one timed measurement of a relay: its CPU over the window.
type window struct {
	pid   int
	start time.Time
	u0    usage
}

func open(pid int) (window, error) {
	u, err := measure(pid)
	return window{pid: pid, start: time.Now(), u0: u}, err
}

// close returns the window's wall time and the relay's CPU in it.
func (w window) close() (wall, cpu time.Duration, err error) {
	u, err := measure(w.pid)
	return time.Since(w.start), u.cpu - w.u0.cpu, err
}

// throughput writes bulk data to the sink through addr on conns connections for d and
// returns Gbit/s received by the sink and the relay's CPU milliseconds per Gbit.
func throughput(r *relay, b *backend, hello []byte, conns int, d time.Duration) (gbps, cpuPerGbit float64, err error) {
	cs := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range cs {
			c.Close()
		}
	}()
	for range conns {
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			return 0, 0, fmt.Errorf("peerbench: %s: dial: %w", r.name, err)
		}
		cs = append(cs, c)
		if _, err := c.Write(hello); err != nil {
			return 0, 0, fmt.Errorf("peerbench: %s: hello: %w", r.name, err)
		}
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	chunk := make([]byte, chunkSize)
	for _, c := range cs {
		wg.Go(func() {
			for !stop.Load() {
				if _, err := c.Write(chunk); err != nil {
					if !stop.Load() {
						errs <- err
					}
					return
				}
			}
		})
	}
	time.Sleep(min(d/10, 200*time.Millisecond)) // warm-up: every connection routed and moving
	n0 := b.received.Load()
	w, err := open(r.p.PID())
	if err != nil {
		return 0, 0, err
	}
	time.Sleep(d)
	wall, cpu, err := w.close()
	n := b.received.Load() - n0
	stop.Store(true)
	for _, c := range cs {
		c.SetWriteDeadline(time.Now())
	}
	wg.Wait()
	close(errs)
	if e := <-errs; e != nil {
		return 0, 0, fmt.Errorf("peerbench: %s: bulk write: %w", r.name, e)
	}
	if err != nil {
		return 0, 0, err
	}
	gbit := float64(n*8) / 1e9
	if gbit == 0 {
		return 0, 0, fmt.Errorf("peerbench: %s: no byte reached the sink in %v", r.name, d)
	}
	return gbit / wall.Seconds(), float64(cpu.Microseconds()) / 1e3 / gbit, nil
}

// latency sends msgSize-byte requests one at a time on one connection through the relay
// for d and returns the round trips' p50 and p99 in microseconds.
func latency(r *relay, hello []byte, d time.Duration) (p50, p99 float64, n int, err error) {
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: dial: %w", r.name, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d + 10*time.Second))
	msg := make([]byte, msgSize)
	buf := make([]byte, msgSize)
	if _, err := c.Write(append(slices.Clip(hello), msg...)); err != nil {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: hello: %w", r.name, err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: first answer: %w", r.name, err)
	}
	lat := make([]time.Duration, 0, 1<<16)
	for end := time.Now().Add(d); time.Now().Before(end); {
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: request: %w", r.name, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: answer: %w", r.name, err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	us := func(q int) float64 { return float64(lat[len(lat)*q/100].Nanoseconds()) / 1e3 }
	return us(50), us(99), len(lat), nil
}

// newConns opens connections through the relay from workers goroutines for d, each one
// sending the hello and one request, reading the answer and closing, and returns
// connections per second and the relay's CPU microseconds per connection.
func newConns(r *relay, hello []byte, workers int, d time.Duration) (perSec, cpuPerConn float64, count int, err error) {
	req := append(slices.Clip(hello), make([]byte, msgSize)...)
	var done atomic.Int64
	var stop atomic.Bool
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	w, err := open(r.p.PID())
	if err != nil {
		return 0, 0, 0, err
	}
	for range workers {
		wg.Go(func() {
			buf := make([]byte, msgSize)
			for !stop.Load() {
				c, err := net.Dial("tcp", r.addr)
				if err != nil {
					errs <- err
					return
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				_, err = c.Write(req)
				if err == nil {
					_, err = io.ReadFull(c, buf)
				}
				c.Close()
				if err != nil {
					errs <- err
					return
				}
				done.Add(1)
			}
		})
	}
	time.Sleep(d)
	stop.Store(true)
	wg.Wait()
	wall, cpu, err := w.close()
	close(errs)
	if e := <-errs; e != nil {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: new connection: %w", r.name, e)
	}
	if err != nil {
		return 0, 0, 0, err
	}
	n := done.Load()
	if n == 0 {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: no connection completed in %v", r.name, d)
	}
	return float64(n) / wall.Seconds(), float64(cpu.Nanoseconds()) / 1e3 / float64(n), int(n), nil
}

// idle holds n connections open through the relay, each routed and answered once, and
// returns the relay's resident memory and descriptors per connection (growth over the
// relay before them) and its total RSS with them open, in MiB.
func idle(r *relay, b *backend, hello []byte, n int) (rssPerConn, fdsPerConn, rssTotal float64, err error) {
	// Connections of earlier phases may still be closing: start from none.
	for deadline := time.Now().Add(30 * time.Second); b.echoConns.Load() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: %d earlier connections still open after 30 s", r.name, b.echoConns.Load())
		}
	}
	before, err := measure(r.p.PID())
	if err != nil {
		return 0, 0, 0, err
	}
	const base = 0
	cs := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range cs {
			c.Close()
		}
	}()
	req := append(slices.Clip(hello), make([]byte, msgSize)...)
	buf := make([]byte, msgSize)
	for range n {
		c, err := net.Dial("tcp", r.addr)
		if err != nil {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: idle dial %d: %w", r.name, len(cs), err)
		}
		cs = append(cs, c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(req); err != nil {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: idle hello: %w", r.name, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: idle answer: %w", r.name, err)
		}
	}
	if got := b.echoConns.Load() - base; got != int64(n) {
		return 0, 0, 0, fmt.Errorf("peerbench: %s: %d of %d idle connections reached the backend", r.name, got, n)
	}
	after, err := measure(r.p.PID())
	if err != nil {
		return 0, 0, 0, err
	}
	for _, c := range cs {
		c.Close()
	}
	cs = nil
	// The next phase starts from a relay that let go of them: poll until the backend saw
	// every connection end (the relay closed its side).
	for deadline := time.Now().Add(30 * time.Second); b.echoConns.Load() != base; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			return 0, 0, 0, fmt.Errorf("peerbench: %s: %d idle connections not released after 30 s", r.name, b.echoConns.Load()-base)
		}
	}
	return float64(after.rss-before.rss) / 1024 / float64(n), float64(after.fds-before.fds) / float64(n), float64(after.rss) / (1 << 20), nil
}
