package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/isthmus-mesh/isthmus/eastwest"
)

// Snapshot is one complete, translated configuration; the proxy swaps it whole.
type Snapshot struct {
	Listeners map[string]*Listener
	Routes    map[string]*RouteTable
	Clusters  map[string]*Cluster
	Endpoints map[string][]netip.AddrPort
	Secrets   map[string]*tls.Certificate
	// ClientCAs are the SDS validation contexts (client CA pools) by name.
	ClientCAs map[string]*x509.CertPool
}

// Options configure a Proxy.
type Options struct {
	// Listen opens a listener for a port (default net.Listen on all addresses).
	Listen func(port uint16) (net.Listener, error)
	// MeshTLS returns the client TLS configuration for mTLS upstream connections (the
	// proxy's mesh certificate and roots) with the given SNI; nil refuses mTLS clusters.
	MeshTLS func(sni string) (*tls.Config, error)
	// Dial dials an upstream endpoint (default a net.Dialer with a 5 s timeout).
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	Log  *slog.Logger
	// Metrics is where the proxy registers its metrics (nil: a private registry).
	Metrics prometheus.Registerer
}

// Proxy serves the listeners of its current snapshot.
type Proxy struct {
	opt  Options
	snap atomic.Pointer[Snapshot]
	m    *metrics

	mu        sync.Mutex
	listeners map[uint16]*portServer
	closed    bool
	applied   time.Time // when the current snapshot was applied; guarded by mu
	wg        sync.WaitGroup

	rr         atomic.Uint64
	transports sync.Map // "cluster|sni|kind" → http.RoundTripper
}

type metrics struct {
	requests  *prometheus.CounterVec // by listener, code
	refusals  *prometheus.CounterVec // by reason
	tcpConns  *prometheus.CounterVec // by cluster
	upstreams *prometheus.CounterVec // upstream failures by cluster
}

// New returns a proxy with an empty snapshot.
func New(opt Options) (*Proxy, error) {
	if opt.Listen == nil {
		opt.Listen = func(port uint16) (net.Listener, error) { return net.Listen("tcp", ":"+strconv.Itoa(int(port))) }
	}
	if opt.Dial == nil {
		d := &net.Dialer{Timeout: 5 * time.Second}
		opt.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	if opt.Log == nil {
		opt.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	reg := opt.Metrics
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		requests:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_proxy_requests_total", Help: "HTTP requests answered, by listener and status code."}, []string{"listener", "code"}),
		refusals:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_proxy_refused_total", Help: "Connections or requests refused, by reason."}, []string{"reason"}),
		tcpConns:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_proxy_tcp_connections_total", Help: "TCP and TLS passthrough connections, by cluster."}, []string{"cluster"}),
		upstreams: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_proxy_upstream_errors_total", Help: "Failed upstream requests or dials, by cluster."}, []string{"cluster"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.refusals, m.tcpConns, m.upstreams} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	p := &Proxy{opt: opt, m: m, listeners: map[uint16]*portServer{}}
	p.snap.Store(&Snapshot{})
	return p, nil
}

// Refusal reasons (the reason label of isthmus_proxy_refused_total).
const (
	RefuseUnknownHost = "unknown_host" // no virtual host: 404
	RefuseNoRoute     = "no_route"     // no route of the virtual host: 404
	RefuseNoCluster   = "no_cluster"   // route to a cluster without endpoints: 503
	RefuseNoSNI       = "no_sni"       // TLS without a server name no chain accepts: closed
	RefuseUnknownSNI  = "unknown_sni"  // a server name no chain accepts: closed
	RefuseBadTLS      = "bad_tls"      // not TLS, or a malformed ClientHello: closed
	RefuseNoCert      = "no_certificate"
	RefuseBadHTTP     = "bad_http" // malformed requests, oversized headers, slow headers
)

// Apply makes s the configuration: listeners of ports no longer configured close,
// new ones open. Listeners that fail to open are logged and retried on the next Apply.
func (p *Proxy) Apply(s *Snapshot) {
	p.snap.Store(s)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.applied = time.Now()
	want := map[uint16]string{}
	for name, l := range s.Listeners {
		want[l.Port] = name
	}
	for port, ps := range p.listeners {
		if name, ok := want[port]; !ok || name != ps.name {
			ps.close()
			delete(p.listeners, port)
		}
	}
	for port, name := range want {
		if _, ok := p.listeners[port]; ok {
			continue
		}
		ln, err := p.opt.Listen(port)
		if err != nil {
			p.opt.Log.Error("opening listener", "listener", name, "err", err)
			continue
		}
		ps := p.newPortServer(name, ln)
		p.listeners[port] = ps
		p.wg.Go(ps.serve)
	}
}

// Close stops every listener and waits for their accept loops.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	for port, ps := range p.listeners {
		ps.close()
		delete(p.listeners, port)
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// portServer is one open port: its accept loop hands connections to a plaintext and a
// TLS-terminated HTTP server, or splices them.
type portServer struct {
	p     *Proxy
	name  string
	ln    net.Listener
	plain *chanListener
	tls   *chanListener
	srvs  []*http.Server
}

func (p *Proxy) newPortServer(name string, ln net.Listener) *portServer {
	ps := &portServer{p: p, name: name, ln: ln, plain: newChanListener(ln.Addr()), tls: newChanListener(ln.Addr())}
	for _, secure := range []bool{false, true} {
		h := http.Handler(&handler{ps: ps, secure: secure})
		srv := &http.Server{
			ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute, MaxHeaderBytes: 60 << 10,
			ErrorLog: slog.NewLogLogger(p.opt.Log.Handler(), slog.LevelDebug),
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				return context.WithValue(ctx, connKey{}, trackedOf(c))
			},
			ConnState: p.connState,
		}
		h2 := &http2.Server{MaxConcurrentStreams: 250, IdleTimeout: 5 * time.Minute}
		if secure {
			if err := http2.ConfigureServer(srv, h2); err != nil {
				p.opt.Log.Error("http2", "err", err)
			}
		} else {
			h = h2c.NewHandler(h, h2)
		}
		srv.Handler = h
		ps.srvs = append(ps.srvs, srv)
	}
	return ps
}

func (ps *portServer) close() {
	ps.ln.Close()
	for _, s := range ps.srvs {
		s.Close()
	}
}

func (ps *portServer) serve() {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { ps.srvs[0].Serve(ps.plain) })
	wg.Go(func() { ps.srvs[1].Serve(ps.tls) })
	defer ps.plain.Close()
	defer ps.tls.Close()
	for {
		c, err := ps.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		wg.Go(func() { ps.handle(c) })
	}
}

// listener returns this port's current listener configuration.
func (ps *portServer) listener() (*Snapshot, *Listener) {
	s := ps.p.snap.Load()
	return s, s.Listeners[ps.name]
}

// chainFor picks the filter chain for a server name: an exact name, then the longest
// "*.suffix", then a chain without names.
func chainFor(l *Listener, sni string) *Chain {
	var best *Chain
	bestLen := -1
	for _, c := range l.Chains {
		if len(c.ServerNames) == 0 {
			if bestLen < 0 {
				best, bestLen = c, 0
			}
			continue
		}
		for _, n := range c.ServerNames {
			switch {
			case n == sni && sni != "":
				return c
			case strings.HasPrefix(n, "*.") && len(sni) > len(n)-1 && strings.HasSuffix(sni, n[1:]) && len(n) > bestLen:
				best, bestLen = c, len(n)
			}
		}
	}
	return best
}

func (ps *portServer) handle(nc net.Conn) {
	c := &trackedConn{Conn: nc}
	s, l := ps.listener()
	if l == nil {
		c.Close()
		return
	}
	if !l.TLS {
		if len(l.Chains) == 1 && l.Chains[0].TCPCluster != "" {
			ps.splice(s, c, nil, l.Chains[0].TCPCluster)
			return
		}
		ps.plain.deliver(c)
		return
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second)) // a slow ClientHello is cut off
	raw, sni, err := eastwest.ReadClientHello(c, 16<<10)
	c.SetReadDeadline(time.Time{})
	if err != nil && !errors.Is(err, eastwest.ErrNoSNI) {
		ps.p.m.refusals.WithLabelValues(RefuseBadTLS).Inc()
		c.Close()
		return
	}
	ch := chainFor(l, sni)
	if ch == nil {
		reason := RefuseUnknownSNI
		if sni == "" {
			reason = RefuseNoSNI
		}
		ps.p.m.refusals.WithLabelValues(reason).Inc()
		c.Close()
		return
	}
	if ch.TCPCluster != "" {
		ps.splice(s, c, raw, ch.TCPCluster)
		return
	}
	cert := s.Secrets[ch.Secret]
	if cert == nil {
		ps.p.m.refusals.WithLabelValues(RefuseNoCert).Inc()
		c.Close()
		return
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{*cert}, NextProtos: []string{"h2", "http/1.1"}, MinVersion: tls.VersionTLS12}
	if ch.ClientCA != "" {
		pool := s.ClientCAs[ch.ClientCA]
		if pool == nil { // the validation context has not arrived: refuse, as Envoy's chain waits
			ps.p.m.refusals.WithLabelValues(RefuseNoCert).Inc()
			c.Close()
			return
		}
		cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, pool
	}
	ps.tls.deliver(tls.Server(&replayConn{Conn: c, r: io.MultiReader(bytes.NewReader(raw), c)}, cfg))
}

// splice relays a TCP or passthrough connection to one of cluster's endpoints, first
// replaying what was read of it.
func (ps *portServer) splice(s *Snapshot, c net.Conn, raw []byte, cluster string) {
	ep, ok := ps.p.pick(s, cluster)
	if !ok {
		ps.p.m.refusals.WithLabelValues(RefuseNoCluster).Inc()
		c.Close()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := ps.p.opt.Dial(ctx, ep.String())
	cancel()
	if err != nil {
		ps.p.m.upstreams.WithLabelValues(cluster).Inc()
		c.Close()
		return
	}
	if len(raw) > 0 {
		if _, err := up.Write(raw); err != nil {
			up.Close()
			c.Close()
			return
		}
	}
	ps.p.m.tcpConns.WithLabelValues(cluster).Inc()
	eastwest.Splice(c, up)
}

// pick chooses an endpoint of cluster round robin.
func (p *Proxy) pick(s *Snapshot, cluster string) (netip.AddrPort, bool) {
	eps := s.Endpoints[cluster]
	if len(eps) == 0 {
		return netip.AddrPort{}, false
	}
	return eps[p.rr.Add(1)%uint64(len(eps))], true
}

// replayConn reads r (the replayed ClientHello, then the connection) instead of Conn.
type replayConn struct {
	net.Conn
	r io.Reader
}

func (c *replayConn) Read(b []byte) (int, error) { return c.r.Read(b) }

// handler is the HTTP side of a port.
type handler struct {
	ps     *portServer
	secure bool
}

type upstreamKey struct{}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if tc, _ := r.Context().Value(connKey{}).(*trackedConn); tc != nil {
		tc.served.Store(true)
	}
	ps := h.ps
	s, l := ps.listener()
	code := h.serve(s, l, w, r)
	ps.p.m.requests.WithLabelValues(ps.name, strconv.Itoa(code)).Inc()
}

// statusWriter records the status code the upstream answered.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (s *statusWriter) WriteHeader(c int) {
	if s.code == 0 {
		s.code = c
	}
	s.ResponseWriter.WriteHeader(c)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.code == 0 {
		s.code = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

func (s *statusWriter) Flush() {
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (h *handler) serve(s *Snapshot, l *Listener, w http.ResponseWriter, r *http.Request) int {
	if l == nil {
		http.Error(w, "no listener", http.StatusServiceUnavailable)
		return http.StatusServiceUnavailable
	}
	var ch *Chain
	if h.secure {
		if r.TLS != nil {
			ch = chainFor(l, r.TLS.ServerName)
		}
	} else if len(l.Chains) > 0 {
		ch = l.Chains[0]
	}
	if ch == nil || ch.Route == "" {
		http.Error(w, "no route configuration", http.StatusNotFound)
		h.ps.p.m.refusals.WithLabelValues(RefuseNoRoute).Inc()
		return http.StatusNotFound
	}
	vh, rt := s.Routes[ch.Route].Match(r.Host, r.URL.RequestURI(), r.Header)
	if vh == nil {
		h.ps.p.m.refusals.WithLabelValues(RefuseUnknownHost).Inc()
		http.Error(w, "no virtual host for "+r.Host, http.StatusNotFound)
		return http.StatusNotFound
	}
	if vh.RequireTLS && !h.secure {
		host, _, err := net.SplitHostPort(r.Host)
		if err != nil {
			host = r.Host
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusMovedPermanently)
		return http.StatusMovedPermanently
	}
	if rt == nil {
		h.ps.p.m.refusals.WithLabelValues(RefuseNoRoute).Inc()
		http.Error(w, "no route", http.StatusNotFound)
		return http.StatusNotFound
	}
	cluster := pickWeighted(rt.Clusters)
	ep, ok := h.ps.p.pick(s, cluster)
	c := s.Clusters[cluster]
	if !ok || c == nil {
		h.ps.p.m.refusals.WithLabelValues(RefuseNoCluster).Inc()
		http.Error(w, "no healthy upstream", http.StatusServiceUnavailable)
		return http.StatusServiceUnavailable
	}
	rt2, err := h.ps.p.transport(c, r.ProtoMajor == 2)
	if err != nil {
		h.ps.p.m.upstreams.WithLabelValues(cluster).Inc()
		http.Error(w, "upstream TLS: "+err.Error(), http.StatusServiceUnavailable)
		return http.StatusServiceUnavailable
	}
	ctx := r.Context()
	if rt.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, rt.Timeout)
		defer cancel()
	}
	sw := &statusWriter{ResponseWriter: w}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			if c.MTLS {
				pr.Out.URL.Scheme = "https"
			}
			pr.Out.URL.Host = ep.String()
			pr.Out.Host = r.Host
			pr.SetXForwarded()
		},
		Transport: rt2,
		// No flush interval: ReverseProxy flushes at once by itself when the answer streams
		// (no Content-Length, as gRPC, or text/event-stream); a sized answer goes out in one
		// write instead of headers and body apart.
		FlushInterval: 0,
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			h.ps.p.m.upstreams.WithLabelValues(cluster).Inc()
			h.ps.p.opt.Log.Debug("upstream", "cluster", cluster, "endpoint", ep, "err", err)
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	rp.ServeHTTP(sw, r.WithContext(ctx))
	if sw.code == 0 {
		sw.code = http.StatusOK
	}
	return sw.code
}

func pickWeighted(cs []WeightedCluster) string {
	if len(cs) == 1 {
		return cs[0].Name
	}
	var sum uint32
	for _, c := range cs {
		sum += c.Weight
	}
	n := rand.Uint32N(sum)
	for _, c := range cs {
		if n < c.Weight {
			return c.Name
		}
		n -= c.Weight
	}
	return cs[len(cs)-1].Name
}

// transport returns an upstream round tripper: HTTP/2 (TLS with ALPN h2, or h2c) for
// HTTP/2 requests, so gRPC and its trailers pass through; HTTP/1.1 otherwise.
func (p *Proxy) transport(c *Cluster, h2 bool) (http.RoundTripper, error) {
	kind := "h1"
	if h2 {
		kind = "h2"
	}
	if c.MTLS {
		kind += "+mtls"
	}
	key := c.Name + "|" + c.SNI + "|" + kind
	if v, ok := p.transports.Load(key); ok { // the common case: no allocation per request
		return v.(http.RoundTripper), nil
	}
	var tc *tls.Config
	if c.MTLS {
		if p.opt.MeshTLS == nil {
			return nil, fmt.Errorf("cluster %s needs mTLS and the proxy has no mesh certificate", c.Name)
		}
		var err error
		if tc, err = p.opt.MeshTLS(c.SNI); err != nil {
			return nil, err
		}
	}
	dial := func(ctx context.Context, _, addr string) (net.Conn, error) { return p.opt.Dial(ctx, addr) }
	if h2 {
		t := &http2.Transport{AllowHTTP: tc == nil}
		t.DialTLSContext = func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if err != nil || tc == nil {
				return conn, err
			}
			cfg := tc.Clone()
			cfg.NextProtos = []string{"h2"}
			tlsConn := tls.Client(conn, cfg)
			if err := tlsConn.HandshakeContext(ctx); err != nil {
				conn.Close()
				return nil, err
			}
			return tlsConn, nil
		}
		return p.cached(key, t), nil
	}
	t := &http.Transport{DialContext: dial, TLSClientConfig: tc, MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second,
		ResponseHeaderTimeout: 0, TLSHandshakeTimeout: 10 * time.Second}
	if tc != nil {
		t.TLSClientConfig = tc.Clone()
		t.TLSClientConfig.NextProtos = []string{"http/1.1"}
	}
	return p.cached(key, t), nil
}

// cached returns the proxy's round tripper under key (cluster, SNI and kind), storing rt
// when there is none yet, so upstream connections are reused.
func (p *Proxy) cached(key string, rt http.RoundTripper) http.RoundTripper {
	v, _ := p.transports.LoadOrStore(key, rt)
	return v.(http.RoundTripper)
}

// chanListener is a net.Listener fed connections by the port's accept loop.
type chanListener struct {
	addr net.Addr
	ch   chan net.Conn
	once sync.Once
	done chan struct{}
}

func newChanListener(a net.Addr) *chanListener {
	return &chanListener{addr: a, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) deliver(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.addr }

// trackedConn is a downstream connection that knows whether any bytes arrived on it and
// whether any request on it reached the handler: one closed with bytes read and no
// request served was refused by the HTTP server itself (a malformed request, oversized
// headers, headers or a request line too slow), which net/http answers without calling a
// handler, so connState counts it as RefuseBadHTTP.
type trackedConn struct {
	net.Conn
	read   atomic.Bool
	served atomic.Bool
}

func (c *trackedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.read.Store(true)
	}
	return n, err
}

type connKey struct{}

// trackedOf finds the trackedConn under a TLS connection and the replayed ClientHello.
func trackedOf(c net.Conn) *trackedConn {
	if t, ok := c.(*tls.Conn); ok {
		c = t.NetConn()
	}
	if r, ok := c.(*replayConn); ok {
		c = r.Conn
	}
	t, _ := c.(*trackedConn)
	return t
}

// connState counts connections the HTTP server closed without serving a request they
// sent bytes for.
func (p *Proxy) connState(c net.Conn, st http.ConnState) {
	if st != http.StateClosed {
		return
	}
	t := trackedOf(c)
	if t == nil || !t.read.Load() || t.served.Load() {
		return
	}
	if tc, ok := c.(*tls.Conn); ok && !tc.ConnectionState().HandshakeComplete {
		p.m.refusals.WithLabelValues(RefuseBadTLS).Inc() // the handshake failed
		return
	}
	p.m.refusals.WithLabelValues(RefuseBadHTTP).Inc()
}
