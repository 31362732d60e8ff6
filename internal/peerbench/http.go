package peerbench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"

	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/proxy"
)

// Direct is the HTTP comparison's baseline: the client calling the backend itself.
const Direct = "direct"

// ingressEnv carries "LISTEN,BACKEND" to the re-executed isthmus proxy relay.
const ingressEnv = "ISTHMUS_PEERBENCH_INGRESS"

// HTTP metric names, the HTTP table's rows in order.
const (
	MH1RPS     = "HTTP/1.1 keep-alive requests/s"
	MH1P50     = "HTTP/1.1 request p50 (µs)"
	MH1P99     = "HTTP/1.1 request p99 (µs)"
	MH1PerCore = "HTTP/1.1 requests per relay CPU second"
	MH2RPS     = "HTTP/2 requests/s (one connection)"
	MH2P50     = "HTTP/2 request p50 (µs)"
	MH2P99     = "HTTP/2 request p99 (µs)"
	MH2PerCore = "HTTP/2 requests per relay CPU second"
)

// HTTPMetrics lists the HTTP rows in table order.
var HTTPMetrics = []string{MH1RPS, MH1P50, MH1P99, MH1PerCore, MH2RPS, MH2P50, MH2P99, MH2PerCore}

// HTTPConfig configures RunHTTP.
type HTTPConfig struct {
	// Rounds of interleaved phases (default 5) of Duration each (default 3 s) per relay.
	Rounds   int
	Duration time.Duration
	// Conns is the HTTP/1.1 clients' connections, each with one request at a time, and
	// the HTTP/2 client's concurrent streams on its one connection; default 16.
	Conns int
	// Dir holds configurations and logs; default a temporary directory, removed after.
	Dir string
	// Progress receives a line per phase; nil discards.
	Progress io.Writer
}

// RunHTTP compares `isthmus proxy` (ingress mode's HTTP path: one plaintext listener,
// one route to one cluster, proxy.Proxy as the command runs it, GOMAXPROCS=1) with nginx
// as a reverse proxy (worker_processes 1, upstream keep-alive) and with the client
// calling the backend directly, on loopback with the same Go backend and client,
// interleaved round after round. HTTP/1.1 runs Conns keep-alive connections; HTTP/2
// runs Conns streams on one h2c connection (prior knowledge; nginx on a second,
// `http2` port). Relay CPU comes from /proc; a relay's requests per CPU second is its
// requests per core. The calling binary must call ServeGatewayIfChild at start.
func RunHTTP(ctx context.Context, cfg HTTPConfig) (*Result, error) {
	if cfg.Rounds == 0 {
		cfg.Rounds = 5
	}
	if cfg.Duration == 0 {
		cfg.Duration = 3 * time.Second
	}
	if cfg.Conns == 0 {
		cfg.Conns = 16
	}
	progress := cfg.Progress
	if progress == nil {
		progress = io.Discard
	}
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "peerbench-http-")
		if err != nil {
			return nil, fmt.Errorf("peerbench: %w", err)
		}
		defer os.RemoveAll(d)
		cfg.Dir = d
	}
	backend, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("peerbench: %w", err)
	}
	body := []byte("ok: a small answer, as an API's\n")
	bs := &http.Server{Handler: h2c.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write(body) }), &http2.Server{MaxConcurrentStreams: 1000})}
	go bs.Serve(backend)
	defer bs.Close()
	baddr := backend.Addr().String()

	type target struct {
		name     string
		h1, h2   string
		pid      int
		shutdown func()
	}
	var targets []*target
	defer func() {
		for _, t := range targets {
			if t.shutdown != nil {
				t.shutdown()
			}
		}
	}()
	targets = append(targets, &target{name: Direct, h1: baddr, h2: baddr})
	for _, name := range []string{Isthmus, Nginx} {
		p1, err := freePort()
		if err != nil {
			return nil, err
		}
		p2, err := freePort()
		if err != nil {
			return nil, err
		}
		t := &target{name: name, h1: fmt.Sprintf("127.0.0.1:%d", p1), h2: fmt.Sprintf("127.0.0.1:%d", p2)}
		p, err := startHTTPRelay(name, cfg.Dir, t.h1, t.h2, baddr)
		if err != nil {
			return nil, err
		}
		t.pid, t.shutdown = p.PID(), func() { p.Stop(5 * time.Second) }
		if name == Isthmus {
			t.h2 = t.h1 // one listener serves HTTP/1.1 and h2c, as the proxy's plaintext ports do
		}
		targets = append(targets, t)
	}
	res := &Result{Rounds: cfg.Rounds, Duration: cfg.Duration, Values: map[string]map[string][]float64{}, Versions: Versions()}
	delete(res.Versions, HAProxy)
	for _, t := range targets {
		res.Relays = append(res.Relays, t.name)
		res.Values[t.name] = map[string][]float64{}
	}
	// isthmus first (the ratios are of it), then the peers.
	slices.SortStableFunc(res.Relays, func(a, b string) int { return rankHTTP(a) - rankHTTP(b) })
	add := func(relay, m string, v float64) { res.Values[relay][m] = append(res.Values[relay][m], v) }
	for round := range cfg.Rounds {
		order := slices.Clone(targets)
		for i := 0; i < round%len(order); i++ { // rotate, so no relay always runs first
			order = append(order[1:], order[0])
		}
		for _, h2 := range []bool{false, true} {
			for _, t := range order {
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				addr := t.h1
				if h2 {
					addr = t.h2
				}
				var before usage
				if t.pid != 0 {
					if before, err = measure(t.pid); err != nil {
						return nil, err
					}
				}
				n, lat, err := httpLoad(ctx, addr, h2, cfg.Conns, cfg.Duration)
				if err != nil {
					return nil, fmt.Errorf("peerbench: %s, HTTP/2 %v: %w", t.name, h2, err)
				}
				var cpu time.Duration
				if t.pid != 0 {
					after, err := measure(t.pid)
					if err != nil {
						return nil, err
					}
					cpu = after.cpu - before.cpu
				}
				rps, p50, p99, per := float64(n)/cfg.Duration.Seconds(), pct(lat, 50), pct(lat, 99), 0.0
				if cpu > 0 {
					per = float64(n) / cpu.Seconds()
				}
				if h2 {
					add(t.name, MH2RPS, rps)
					add(t.name, MH2P50, p50)
					add(t.name, MH2P99, p99)
					add(t.name, MH2PerCore, per)
				} else {
					add(t.name, MH1RPS, rps)
					add(t.name, MH1P50, p50)
					add(t.name, MH1P99, p99)
					add(t.name, MH1PerCore, per)
				}
				fmt.Fprintf(progress, "round %d/%d %s HTTP/%d: %.0f requests/s, p50 %.0f µs, p99 %.0f µs, relay CPU %v\n",
					round+1, cfg.Rounds, t.name, map[bool]int{false: 1, true: 2}[h2], rps, p50, p99, cpu)
			}
		}
	}
	return res, nil
}

func rankHTTP(name string) int {
	switch name {
	case Isthmus:
		return 0
	case Nginx:
		return 1
	}
	return 2
}

// pct returns the p-th percentile of lat in microseconds (lat is sorted in place).
func pct(lat []time.Duration, p int) float64 {
	if len(lat) == 0 {
		return 0
	}
	slices.Sort(lat)
	i := min(len(lat)-1, len(lat)*p/100)
	return float64(lat[i]) / float64(time.Microsecond)
}

// httpLoad sends GETs to addr for d: conns HTTP/1.1 keep-alive connections with one
// request each at a time, or conns concurrent streams on one h2c connection. Every
// answer must be 200 with the backend's body, or the phase fails.
func httpLoad(ctx context.Context, addr string, h2 bool, conns int, d time.Duration) (int, []time.Duration, error) {
	var rt http.RoundTripper
	if h2 {
		rt = &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, a string, _ *tls.Config) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, a)
		}}
	} else {
		rt = &http.Transport{MaxIdleConnsPerHost: conns, MaxConnsPerHost: conns, DisableCompression: true}
	}
	defer func() {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}()
	client := &http.Client{Transport: rt, Timeout: 10 * time.Second}
	scheme := "http://"
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	end, _ := ctx.Deadline()
	// over says the phase has ended: a dial or read cut by the phase's deadline can
	// return a moment before the context reports it.
	over := func() bool { return ctx.Err() != nil || time.Until(end) < 50*time.Millisecond }
	var (
		mu    sync.Mutex
		lat   []time.Duration
		first error
		wg    sync.WaitGroup
	)
	for range conns {
		wg.Go(func() {
			var mine []time.Duration
			for ctx.Err() == nil {
				start := time.Now()
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, scheme+addr+"/bench", nil)
				req.Host = "bench.example.com"
				resp, err := client.Do(req)
				if err != nil {
					if over() {
						break
					}
					mu.Lock()
					first = cmpErr(first, err)
					mu.Unlock()
					return
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil && over() {
					break
				}
				if err != nil || resp.StatusCode != http.StatusOK || !strings.HasPrefix(string(b), "ok:") {
					mu.Lock()
					first = cmpErr(first, fmt.Errorf("answer %d %q %v", resp.StatusCode, b, err))
					mu.Unlock()
					return
				}
				mine = append(mine, time.Since(start))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		})
	}
	wg.Wait()
	if first != nil {
		return 0, nil, first
	}
	if len(lat) == 0 {
		return 0, nil, errors.New("no request answered")
	}
	return len(lat), lat, nil
}

func cmpErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// startHTTPRelay starts name as a reverse proxy for backend on h1 (and, for nginx, h2c on
// h2), one worker.
func startHTTPRelay(name, dir, h1, h2, backend string) (*proc.Process, error) {
	var bin string
	var args, env []string
	switch name {
	case Nginx:
		conf := fmt.Sprintf(`daemon off;
worker_processes 1;
worker_rlimit_nofile 4096;
pid %s;
error_log %s warn;
events { worker_connections 2048; }
http {
    access_log off;
    client_body_temp_path %s;
    proxy_temp_path %s;
    upstream be { server %s; keepalive 64; }
    server {
        listen %s;
        listen %s http2;
        keepalive_requests 10000000; # the clients' connections last the whole phase, as the proxy's do
        location / {
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
`, filepath.Join(dir, "nginx-http.pid"), filepath.Join(dir, "nginx-http-error.log"), filepath.Join(dir, "body"), filepath.Join(dir, "proxy"), backend, h1, h2)
		path := filepath.Join(dir, "nginx-http.conf")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			return nil, fmt.Errorf("peerbench: write nginx config: %w", err)
		}
		bin, args = nginxBin, []string{"-p", dir, "-c", path, "-e", filepath.Join(dir, "nginx-http-error.log")}
	case Isthmus:
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("peerbench: find own binary for the proxy: %w", err)
		}
		bin, env = exe, []string{ingressEnv + "=" + h1 + "," + backend, "GOMAXPROCS=1"}
	default:
		return nil, fmt.Errorf("peerbench: unknown HTTP relay %q", name)
	}
	p, err := proc.Start(name+"-http", bin, args, filepath.Join(dir, name+"-http.log"), false, env)
	if err != nil {
		return nil, fmt.Errorf("peerbench: %w", err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", h1, time.Second)
		if err == nil {
			c.Close()
			return p, nil
		}
		if p.Exited() || time.Now().After(deadline) {
			p.Stop(time.Second)
			if p.Exited() {
				return nil, fmt.Errorf("peerbench: %s: %w (log %s)", name, p.ExitError(), filepath.Join(dir, name+"-http.log"))
			}
			return nil, fmt.Errorf("peerbench: %s not listening on %s after 20 s", name, h1)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveIngress runs proxy.Proxy with one plaintext listener on LISTEN routing every
// request to BACKEND ("LISTEN,BACKEND"), until SIGTERM.
func serveIngress(spec string) error {
	listen, backend, ok := strings.Cut(spec, ",")
	if !ok {
		return fmt.Errorf("peerbench proxy: %q: want LISTEN,BACKEND", spec)
	}
	be, err := netip.ParseAddrPort(backend)
	if err != nil {
		return fmt.Errorf("peerbench proxy: backend: %w", err)
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("peerbench proxy: %w", err)
	}
	var once sync.Once
	p, err := proxy.New(proxy.Options{Metrics: prometheus.NewRegistry(),
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Listen: func(uint16) (net.Listener, error) {
			var ln net.Listener
			once.Do(func() { ln = l })
			if ln == nil {
				return nil, errors.New("one listener only")
			}
			return ln, nil
		}})
	if err != nil {
		return err
	}
	p.Apply(&proxy.Snapshot{
		Listeners: map[string]*proxy.Listener{"0.0.0.0_80": {Name: "0.0.0.0_80", Port: 80, Chains: []*proxy.Chain{{Route: "http.80"}}}},
		Routes: map[string]*proxy.RouteTable{"http.80": {Name: "http.80", VHosts: []*proxy.VHost{{Name: "bench", Domains: []string{"*"},
			Routes: []*proxy.Route{{Name: "all", Prefix: "/", Clusters: []proxy.WeightedCluster{{Name: "be", Weight: 1}}}}}}}},
		Clusters:  map[string]*proxy.Cluster{"be": {Name: "be"}},
		Endpoints: map[string][]netip.AddrPort{"be": {be}},
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	<-ctx.Done()
	p.Close()
	return nil
}

// HTTPTable renders the HTTP comparison: medians per relay and isthmus's ratio to each
// peer (>1 is better for isthmus on every row).
func (r *Result) HTTPTable() string {
	var b strings.Builder
	peers := slices.DeleteFunc(slices.Clone(r.Relays), func(s string) bool { return s == Isthmus })
	fmt.Fprintf(&b, "%-40s", "metric (median)")
	for _, relay := range r.Relays {
		fmt.Fprintf(&b, " %12s", relay)
	}
	for _, p := range peers {
		fmt.Fprintf(&b, " %14s", "isthmus/"+p)
	}
	b.WriteString("\n")
	for _, m := range HTTPMetrics {
		fmt.Fprintf(&b, "%-40s", m)
		for _, relay := range r.Relays {
			fmt.Fprintf(&b, " %12.0f", r.Median(relay, m))
		}
		for _, p := range peers {
			ours, theirs := r.Median(Isthmus, m), r.Median(p, m)
			if ours == 0 || theirs == 0 {
				fmt.Fprintf(&b, " %14s", "—")
				continue
			}
			ratio := ours / theirs
			if strings.Contains(m, "(µs)") {
				ratio = theirs / ours // lower latency is better
			}
			fmt.Fprintf(&b, " %14.2f", ratio)
		}
		b.WriteString("\n")
	}
	return b.String()
}
