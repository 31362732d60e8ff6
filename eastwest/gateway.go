package eastwest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Config configures a Gateway. Zero values are the documented defaults.
type Config struct {
	// Routes is the routing table (filled by the xDS client); required.
	Routes *Table
	// HelloTimeout bounds how long a client may take to send its ClientHello; default 10 s.
	HelloTimeout time.Duration
	// MaxHello bounds the ClientHello size; default 16 KiB (post-quantum key shares make
	// hellos of 1–2 KiB; nothing legitimate is near the limit).
	MaxHello int
	// DialTimeout bounds each dial of an endpoint; default 5 s. A failed dial is retried on
	// the service's next endpoint.
	DialTimeout time.Duration
	// IdleTimeout closes a connection that moved no byte in either direction for this long;
	// default 1 h.
	IdleTimeout time.Duration
	// MaxConnections bounds concurrent connections; default 100,000. Connections over the
	// limit are closed at once and counted.
	MaxConnections int
	// Dial replaces the dialer (tests, network namespaces); nil dials TCP.
	Dial func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)
	// Log receives per-connection refusals at debug level; nil discards.
	Log *slog.Logger
	// Metrics registers the gateway's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

// Gateway is the east-west gateway: a TLS passthrough proxy routing on SNI.
type Gateway struct {
	cfg     Config
	sem     chan struct{}
	conns   prometheus.Gauge
	total   *prometheus.CounterVec
	bytes   prometheus.Counter
	mu      sync.Mutex
	active  map[net.Conn]struct{} // guarded by mu
	lis     []net.Listener        // guarded by mu
	closing bool                  // guarded by mu
	wg      sync.WaitGroup
}

// Refusal reasons, the "result" label of isthmus_eastwest_connections_total.
const (
	ResultProxied    = "proxied"
	ResultNotTLS     = "not_tls"
	ResultMalformed  = "malformed"
	ResultNoSNI      = "no_sni"
	ResultBadSNI     = "bad_sni"
	ResultUnknownSNI = "unknown_sni"
	ResultTooLarge   = "too_large"
	ResultTimeout    = "hello_timeout"
	ResultLimit      = "connection_limit"
	ResultDialFailed = "dial_failed"
)

// New validates cfg and returns a gateway.
func New(cfg Config) (*Gateway, error) {
	if cfg.Routes == nil {
		return nil, errors.New("eastwest: Routes is required")
	}
	if cfg.HelloTimeout == 0 {
		cfg.HelloTimeout = 10 * time.Second
	}
	if cfg.MaxHello == 0 {
		cfg.MaxHello = 16 * 1024
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = time.Hour
	}
	if cfg.MaxConnections == 0 {
		cfg.MaxConnections = 100000
	}
	if cfg.Dial == nil {
		cfg.Dial = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", a.String())
		}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Metrics == nil {
		cfg.Metrics = prometheus.NewRegistry()
	}
	g := &Gateway{
		cfg:    cfg,
		sem:    make(chan struct{}, cfg.MaxConnections),
		active: map[net.Conn]struct{}{},
		conns:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_eastwest_active_connections", Help: "Connections being proxied."}),
		total:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_eastwest_connections_total", Help: "Accepted connections by result."}, []string{"result"}),
		bytes:  prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_eastwest_bytes_total", Help: "Bytes proxied, both directions."}),
	}
	for _, c := range []prometheus.Collector{g.conns, g.total, g.bytes} {
		if err := cfg.Metrics.Register(c); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// Serve accepts connections on l until l is closed (by Shutdown), proxying each by SNI.
func (g *Gateway) Serve(l net.Listener) error {
	g.mu.Lock()
	if g.closing {
		g.mu.Unlock()
		return net.ErrClosed
	}
	g.lis = append(g.lis, l)
	g.mu.Unlock()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("eastwest: accept: %w", err)
		}
		select {
		case g.sem <- struct{}{}:
		default:
			g.total.WithLabelValues(ResultLimit).Inc()
			c.Close()
			continue
		}
		if !g.track(c) {
			<-g.sem
			c.Close()
			return nil
		}
		go func() {
			defer func() { g.untrack(c); <-g.sem }()
			g.handle(c)
		}()
	}
}

func (g *Gateway) track(c net.Conn) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closing {
		return false
	}
	g.active[c] = struct{}{}
	g.wg.Add(1)
	g.conns.Inc()
	return true
}

func (g *Gateway) untrack(c net.Conn) {
	g.mu.Lock()
	delete(g.active, c)
	g.mu.Unlock()
	g.conns.Dec()
	g.wg.Done()
}

// Shutdown stops accepting, lets in-flight connections finish until ctx ends, then closes
// the rest. It returns once every connection's goroutine has ended.
func (g *Gateway) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	g.closing = true
	for _, l := range g.lis {
		l.Close()
	}
	g.mu.Unlock()
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	for c := range g.active {
		c.Close()
	}
	g.mu.Unlock()
	<-done
	return ctx.Err()
}

func (g *Gateway) refuse(c net.Conn, result string, err error) {
	g.total.WithLabelValues(result).Inc()
	g.cfg.Log.Debug("refused connection", "remote", c.RemoteAddr(), "result", result, "err", err)
	c.Close()
}

func (g *Gateway) handle(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(g.cfg.HelloTimeout))
	hello, sni, err := readClientHello(c, g.cfg.MaxHello)
	if err != nil {
		var ne net.Error
		switch {
		case errors.As(err, &ne) && ne.Timeout():
			g.refuse(c, ResultTimeout, err)
		case errors.Is(err, ErrNotTLS):
			g.refuse(c, ResultNotTLS, err)
		case errors.Is(err, ErrNoSNI):
			g.refuse(c, ResultNoSNI, err)
		case errors.Is(err, ErrTooLarge):
			g.refuse(c, ResultTooLarge, err)
		default:
			g.refuse(c, ResultMalformed, err)
		}
		return
	}
	c.SetReadDeadline(time.Time{})
	route, err := ParseSNI(sni)
	if err != nil {
		g.refuse(c, ResultBadSNI, err)
		return
	}
	eps := g.cfg.Routes.Endpoints(route.ClusterName())
	if len(eps) == 0 {
		g.refuse(c, ResultUnknownSNI, fmt.Errorf("no endpoints for %s", route.ClusterName()))
		return
	}
	var up net.Conn
	for _, ep := range eps { // the next endpoint on every failed dial
		ctx, cancel := context.WithTimeout(context.Background(), g.cfg.DialTimeout)
		up, err = g.cfg.Dial(ctx, ep)
		cancel()
		if err == nil {
			break
		}
		g.cfg.Log.Debug("dial endpoint", "endpoint", ep, "err", err)
	}
	if up == nil {
		g.refuse(c, ResultDialFailed, err)
		return
	}
	defer up.Close()
	if _, err := up.Write(hello); err != nil {
		g.refuse(c, ResultDialFailed, err)
		return
	}
	g.total.WithLabelValues(ResultProxied).Inc()
	g.pipe(c, up)
}

// pipe copies both ways until both directions end, propagating half-closes. Both sides
// are handed to io.Copy as they are (*net.TCPConn for TCP), so Linux splices the bytes in
// the kernel; an idle watchdog reads the kernel's byte counters instead of wrapping the
// connections, which would disable splice.
func (g *Gateway) pipe(down, up net.Conn) {
	defer down.Close()
	stop := make(chan struct{})
	defer close(stop)
	go g.watchIdle(down, up, stop)
	var wg sync.WaitGroup
	copyHalf := func(dst, src net.Conn) {
		defer wg.Done()
		n, _ := io.Copy(dst, src)
		g.bytes.Add(float64(n))
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
	}
	wg.Add(2)
	go copyHalf(up, down)
	go copyHalf(down, up)
	wg.Wait()
}

// watchIdle closes both connections when neither has received a byte for IdleTimeout.
func (g *Gateway) watchIdle(a, b net.Conn, stop <-chan struct{}) {
	interval := max(g.cfg.IdleTimeout/4, 10*time.Millisecond)
	t := time.NewTicker(interval)
	defer t.Stop()
	last := received(a) + received(b)
	lastChange := time.Now()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		n := received(a) + received(b)
		if n != last {
			last, lastChange = n, time.Now()
			continue
		}
		if time.Since(lastChange) >= g.cfg.IdleTimeout {
			g.total.WithLabelValues("idle_timeout").Inc()
			a.Close()
			b.Close()
			return
		}
	}
}

// received returns the bytes the kernel has received on a TCP connection (0 for others).
func received(c net.Conn) uint64 {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint64
	raw.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Bytes_received
		}
	})
	return n
}
