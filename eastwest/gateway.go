package eastwest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/isthmus-mesh/isthmus/mesh"
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

// Gateway is the east-west gateway: a TLS passthrough proxy routing on SNI. It never
// terminates TLS and holds no key: it reads the ClientHello's server name, picks an
// endpoint of the service port that name designates on its own network, replays the hello
// bytes to it and then copies both ways. Serve may be called on several listeners; one
// Shutdown stops them all.
type Gateway struct {
	cfg Config
	// sem holds one token per connection being handled; a full sem refuses at once
	// (ResultLimit) instead of queueing, so an overload never grows memory.
	sem   chan struct{}
	conns prometheus.Gauge
	total *prometheus.CounterVec
	bytes prometheus.Counter
	// proxied is total's proxied child, looked up once instead of per connection.
	proxied prometheus.Counter
	// snis caches parsed server names (string → mesh.OutboundName), at most
	// maxCachedSNIs of them: names arrive from the network, so the cache must not grow
	// with whatever a client sends. Only names that parse are kept.
	snis  sync.Map
	nsnis atomic.Int32

	// mu guards active, lis and closing. Shutdown holds it while closing listeners and
	// connections; nothing holds it across I/O that can block.
	mu      sync.Mutex
	active  map[net.Conn]struct{} // client connections being handled, for Shutdown to close
	lis     []net.Listener        // every listener Serve is accepting on
	closing bool                  // set by Shutdown; track refuses new connections after it
	// wg counts handler goroutines; Add happens under mu with closing false, so that
	// Shutdown's Wait never races an Add.
	wg sync.WaitGroup
	// workers runs the handlers and the second relay half of each connection.
	workers *workers
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
	// ResultNotExported refuses, on a peer listener (ServePeers), a server name that is
	// not an exported service under its federation name.
	ResultNotExported = "not_exported"
)

// New validates cfg, fills in the defaults documented on Config and registers the
// gateway's metrics (isthmus_eastwest_*); it fails when they are already registered.
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
		// Not Dialer.DialTCP: with no local address it still binds port 0 before
		// connecting, which fails with EADDRINUSE once loopback ports sit in TIME_WAIT
		// (measured: 1,110 of 20,000 dials), where connect picks a port per destination.
		var d net.Dialer
		cfg.Dial = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
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
		cfg:     cfg,
		sem:     make(chan struct{}, cfg.MaxConnections),
		workers: newWorkers(),
		active:  map[net.Conn]struct{}{},
		conns:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_eastwest_active_connections", Help: "Connections being proxied."}),
		total:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_eastwest_connections_total", Help: "Accepted connections by result."}, []string{"result"}),
		bytes:   prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_eastwest_bytes_total", Help: "Bytes proxied, both directions."}),
	}
	g.proxied = g.total.WithLabelValues(ResultProxied)
	for _, c := range []prometheus.Collector{g.conns, g.total, g.bytes} {
		if err := cfg.Metrics.Register(c); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// Serve accepts connections on l until l is closed (by Shutdown), proxying each by SNI in
// its own goroutine. It returns nil after Shutdown (or net.ErrClosed when called after
// it), and an error only for an accept failure that is not temporary. Connections over
// MaxConnections are closed at once and counted.
func (g *Gateway) Serve(l net.Listener) error { return g.serve(l, false) }

// ServePeers is Serve for a listener that peer meshes reach (the address announced to
// them as the mesh's federation gateway): it routes only names of exported services
// under their federation name, which the primary puts in the gateway's view for exactly
// the exported ports. Any other name, a local cluster.local one included, is refused as
// not_exported whatever certificate the client would present (the gateway never sees
// it: it passes TLS through). Which peer an export is for is not decided here (the
// gateway cannot authenticate the client); docs/federation.md says what enforces it.
func (g *Gateway) ServePeers(l net.Listener) error { return g.serve(l, true) }

// serve accepts on l; peers restricts routing as ServePeers says.
func (g *Gateway) serve(l net.Listener, peers bool) error {
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
		g.workers.goRun(func() {
			defer func() { g.untrack(c); <-g.sem }()
			g.handle(c, peers)
		})
	}
}

// track registers c as active and counts its goroutine; it returns false once Shutdown
// has begun, and the caller then closes c itself.
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

// untrack undoes track when c's handler returns.
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
	g.workers.stop()
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

// refuse counts a connection under result, logs why at debug level (a scan or a
// misrouted client must not flood the log) and closes it.
func (g *Gateway) refuse(c net.Conn, result string, err error) {
	g.total.WithLabelValues(result).Inc()
	g.cfg.Log.Debug("refused connection", "remote", c.RemoteAddr(), "result", result, "err", err)
	c.Close()
}

// handle proxies one client connection and closes it. Each way it can fail is refused
// under its own result label: the hello (timeout, not TLS, no SNI, too large,
// malformed), the name (bad_sni: not outbound_.<port>_.<subset>_.<host>; unknown_sni: no
// endpoint on this network; not_exported: on a peer listener, not an exported service's
// federation name) and the dial (every endpoint tried once, round robin).
func (g *Gateway) handle(c net.Conn, peers bool) {
	c.SetReadDeadline(time.Now().Add(g.cfg.HelloTimeout))
	hello, sni, err := readHelloAndMore(c, g.cfg.MaxHello)
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
	c.SetReadDeadline(time.Time{}) // after the hello, only the idle timeout applies
	route, err := g.parseSNI(sni)
	if err != nil {
		g.refuse(c, ResultBadSNI, err)
		return
	}
	if peers && (!strings.HasSuffix(string(route.Host), mesh.FederationDomainSuffix) || route.Subset != "" || !g.cfg.Routes.Has(route)) {
		g.refuse(c, ResultNotExported, fmt.Errorf("%s is not an exported service's federation name", sni))
		return
	}
	eps := g.cfg.Routes.Endpoints(route)
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
	// The hello (and whatever followed it in the same reads) was consumed from c; the
	// backend must see it first, byte for byte, or the TLS handshake (whose transcript
	// covers it) fails.
	if _, err := up.Write(hello); err != nil {
		g.refuse(c, ResultDialFailed, err)
		return
	}
	g.proxied.Inc()
	g.pipe(c, up)
}

// maxCachedSNIs bounds Gateway.snis.
const maxCachedSNIs = 4096

// parseSNI is mesh.ParseSNI through the gateway's cache: a server name is parsed once,
// not on every connection (it was 4% of the gateway's CPU per new connection).
func (g *Gateway) parseSNI(sni string) (mesh.OutboundName, error) {
	if v, ok := g.snis.Load(sni); ok {
		return v.(mesh.OutboundName), nil
	}
	n, err := mesh.ParseSNI(sni)
	if err == nil && g.nsnis.Add(1) <= maxCachedSNIs {
		g.snis.Store(sni, n)
	}
	return n, err
}

// helloReaders holds the buffered readers the ClientHello is read through, so that a
// connection costs no reader allocation.
var helloReaders = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 4096) }}

// readHelloAndMore reads c's ClientHello as readClientHello does, but through a buffer,
// so that the hello usually takes one read; bytes the client sent after it in the same
// reads are appended to raw (they go to the backend right after the hello anyway).
func readHelloAndMore(c net.Conn, limit int) (raw []byte, sni string, err error) {
	br := helloReaders.Get().(*bufio.Reader)
	br.Reset(c)
	defer func() { br.Reset(nil); helloReaders.Put(br) }()
	raw, sni, err = readClientHello(br, limit)
	if err == nil && br.Buffered() > 0 {
		more, _ := br.Peek(br.Buffered())
		raw = append(raw, more...)
	}
	return raw, sni, err
}

// pipe copies both ways until both directions end, propagating half-closes: the calling
// goroutine carries down → up and one more goroutine up → down (relay: small messages
// copied through a pooled buffer, bulk spliced in the kernel, nothing held while idle).
// The idle watchdog is a timer, not a goroutine, fed by the halves' activity counter.
func (g *Gateway) pipe(down, up net.Conn) {
	defer down.Close()
	var l link
	stop := g.watchIdle(down, up, &l.activity)
	defer stop()
	done := make(chan struct{})
	g.workers.goRun(func() {
		g.bytes.Add(float64(relay(down, up, &l)))
		close(done)
	})
	g.bytes.Add(float64(relay(up, down, &l)))
	<-done
}

// watchIdle closes both connections when activity has not moved for IdleTimeout,
// checking four times per timeout on a timer, until the returned stop is called. Stop
// returns only when no check runs any more, so nothing keeps the connections after it.
func (g *Gateway) watchIdle(a, b net.Conn, activity *atomic.Uint64) (stop func()) {
	interval := max(g.cfg.IdleTimeout/4, 10*time.Millisecond)
	var (
		// mu orders a check's re-arming against stop: a check never re-arms a stopped
		// timer.
		mu         sync.Mutex
		stopped    bool
		last       = activity.Load()
		lastChange = time.Now()
		t          *time.Timer
	)
	mu.Lock()
	defer mu.Unlock()
	t = time.AfterFunc(interval, func() {
		mu.Lock()
		defer mu.Unlock()
		if stopped {
			return
		}
		if n := activity.Load(); n != last {
			last, lastChange = n, time.Now()
		} else if time.Since(lastChange) >= g.cfg.IdleTimeout {
			g.total.WithLabelValues("idle_timeout").Inc()
			a.Close()
			b.Close()
			return
		}
		t.Reset(interval)
	})
	return func() {
		mu.Lock()
		stopped = true
		t.Stop()
		mu.Unlock()
	}
}
