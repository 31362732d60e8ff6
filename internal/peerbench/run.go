package peerbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"time"
)

// Config configures Run. Zero values are the documented defaults.
type Config struct {
	// Relays to compare; default Isthmus, nginx and HAProxy. The first is the one the
	// ratios are of. LABEL=PATH (LABEL starting "isthmus") adds the gateway of another
	// benchpeers build, for before/after runs.
	Relays []string
	// Rounds is how many interleaved rounds run (each relay once per phase per round, the
	// order rotating per round); default 5. Figures are medians over rounds.
	Rounds int
	// Duration is each timed phase's length per relay; default 3 s.
	Duration time.Duration
	// IdleConns is how many idle connections the memory phase holds; default 1,000.
	IdleConns int
	// Workers is how many clients open new connections at once; default 4.
	Workers int
	// Dir holds the relays' configurations and logs; default a new temporary directory,
	// removed at the end.
	Dir string
	// Phases limits the run to the phases named (throughput, latency, pinned, connect,
	// idle); default all. The table then has zeros for the others.
	Phases []string
	// Syscalls, when set, ends the run with one strace'd connect phase and one latency
	// phase per relay, and fills Result.Syscalls (needs strace; its rates are not kept).
	Syscalls bool
	// Progress receives one line per phase; nil discards.
	Progress io.Writer
}

// Metric names, the table's rows in order.
const (
	MThroughput1  = "throughput, 1 connection (Gbit/s)"
	MThroughput16 = "throughput, 16 connections (Gbit/s)"
	MCPUGbit1     = "relay CPU per Gbit, 1 connection (ms)"
	MCPUGbit16    = "relay CPU per Gbit, 16 connections (ms)"
	MP50          = "request p50 (µs)"
	MP99          = "request p99 (µs)"
	MP50Pinned    = "request p50, all on one core (µs)"
	MP99Pinned    = "request p99, all on one core (µs)"
	MConnsPerSec  = "new connections per second"
	MCPUConn      = "relay CPU per new connection (µs)"
	MRSSPerConn   = "RSS per idle connection (KiB)"
	MFDsPerConn   = "descriptors per idle connection"
	MRSSTotal     = "RSS with the idle connections open (MiB)"
)

// Metrics lists the rows in table order.
var Metrics = []string{MThroughput1, MThroughput16, MCPUGbit1, MCPUGbit16, MP50, MP99, MP50Pinned, MP99Pinned,
	MConnsPerSec, MCPUConn, MRSSPerConn, MFDsPerConn, MRSSTotal}

// HigherIsBetter reports whether a larger value of metric m is the better one.
func HigherIsBetter(m string) bool {
	return m == MThroughput1 || m == MThroughput16 || m == MConnsPerSec
}

// Result holds every round's figure per relay and metric.
type Result struct {
	Relays   []string                        `json:"relays"`
	Rounds   int                             `json:"rounds"`
	Duration time.Duration                   `json:"duration"`
	Values   map[string]map[string][]float64 `json:"values"` // relay → metric → one per round
	Versions map[string]string               `json:"versions"`
	// Syscalls holds, with Config.Syscalls, per relay the counts of a "connect" phase
	// (per new connection) and a "request" phase (per round trip).
	Syscalls map[string]map[string]SyscallCount `json:"syscalls,omitempty"`
}

// Median returns the median over rounds of relay's metric (0 when none).
func (r *Result) Median(relay, metric string) float64 {
	v := slices.Clone(r.Values[relay][metric])
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// Run starts the relays, runs cfg.Rounds interleaved rounds of every phase against them
// and stops them. The peers must be installed (Ensure), and the calling binary must call
// ServeGatewayIfChild at start. A relay that fails a phase fails the run: a broken
// configuration must not turn into a figure.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if len(cfg.Relays) == 0 {
		cfg.Relays = []string{Isthmus, Nginx, HAProxy}
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 5
	}
	if cfg.Duration == 0 {
		cfg.Duration = 3 * time.Second
	}
	if cfg.IdleConns == 0 {
		cfg.IdleConns = 1000
	}
	if cfg.Workers == 0 {
		cfg.Workers = 4
	}
	if cfg.IdleConns > maxIdleConns {
		return nil, fmt.Errorf("peerbench: IdleConns %d over the relays' limit %d", cfg.IdleConns, maxIdleConns)
	}
	progress := cfg.Progress
	if progress == nil {
		progress = io.Discard
	}
	if cfg.Dir == "" {
		d, err := os.MkdirTemp("", "peerbench-")
		if err != nil {
			return nil, fmt.Errorf("peerbench: %w", err)
		}
		defer os.RemoveAll(d)
		cfg.Dir = d
	}
	hello := map[string][]byte{}
	for _, sni := range []string{sinkSNI, echoSNI} {
		h, err := clientHello(sni)
		if err != nil {
			return nil, err
		}
		hello[sni] = h
	}
	if len(hello[sinkSNI]) != len(hello[echoSNI]) {
		return nil, errors.New("peerbench: the two routes' hellos differ in length; the backend skips one length")
	}
	b, err := newBackend(len(hello[sinkSNI]))
	if err != nil {
		return nil, err
	}
	defer b.close()
	relays := map[string]*relay{}
	defer func() {
		for _, r := range relays {
			r.stop()
		}
	}()
	var names []string // the relays' labels
	for _, spec := range cfg.Relays {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		r, err := startRelay(spec, cfg.Dir, port, b.routes())
		if err != nil {
			return nil, err
		}
		relays[r.name] = r
		names = append(names, r.name)
	}
	res := &Result{Relays: names, Rounds: cfg.Rounds, Duration: cfg.Duration, Values: map[string]map[string][]float64{}, Versions: Versions()}
	for _, name := range names {
		res.Values[name] = map[string][]float64{}
	}
	add := func(relay, metric string, v float64) {
		res.Values[relay][metric] = append(res.Values[relay][metric], v)
	}
	type phase struct {
		name string
		run  func(r *relay) error
	}
	phases := []phase{
		{"throughput", func(r *relay) error {
			g, c, err := throughput(r, b, hello[sinkSNI], 1, cfg.Duration)
			add(r.name, MThroughput1, g)
			add(r.name, MCPUGbit1, c)
			return err
		}},
		{"throughput", func(r *relay) error {
			g, c, err := throughput(r, b, hello[sinkSNI], 16, cfg.Duration)
			add(r.name, MThroughput16, g)
			add(r.name, MCPUGbit16, c)
			return err
		}},
		{"latency", func(r *relay) error {
			p50, p99, _, err := latency(r, hello[echoSNI], cfg.Duration)
			add(r.name, MP50, p50)
			add(r.name, MP99, p99)
			return err
		}},
		{"pinned", func(r *relay) error {
			restore, err := pin(append(tree(r.p.PID()), os.Getpid()), []int{0})
			if err != nil {
				return err
			}
			p50, p99, _, err := latency(r, hello[echoSNI], cfg.Duration)
			restore()
			add(r.name, MP50Pinned, p50)
			add(r.name, MP99Pinned, p99)
			return err
		}},
		{"connect", func(r *relay) error {
			n, c, _, err := newConns(r, hello[echoSNI], cfg.Workers, cfg.Duration)
			add(r.name, MConnsPerSec, n)
			add(r.name, MCPUConn, c)
			return err
		}},
		{"idle", func(r *relay) error {
			m, f, t, err := idle(r, b, hello[echoSNI], cfg.IdleConns)
			add(r.name, MRSSPerConn, m)
			add(r.name, MFDsPerConn, f)
			add(r.name, MRSSTotal, t)
			return err
		}},
	}
	if len(cfg.Phases) > 0 {
		phases = slices.DeleteFunc(phases, func(p phase) bool { return !slices.Contains(cfg.Phases, p.name) })
	}
	for round := range cfg.Rounds {
		for _, ph := range phases {
			for i := range names {
				name := names[(i+round)%len(names)] // rotate who goes first
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				r := relays[name]
				if r.p.Exited() {
					return nil, fmt.Errorf("peerbench: %w", r.p.ExitError())
				}
				if err := ph.run(r); err != nil {
					return nil, fmt.Errorf("round %d, %s: %w", round+1, ph.name, err)
				}
				fmt.Fprintf(progress, "round %d/%d %-10s %s done\n", round+1, cfg.Rounds, ph.name, name)
			}
		}
	}
	if cfg.Syscalls {
		res.Syscalls = map[string]map[string]SyscallCount{}
		for _, name := range names {
			r := relays[name]
			res.Syscalls[name] = map[string]SyscallCount{}
			d := min(cfg.Duration, 2*time.Second)
			c, err := traced(r, cfg.Dir, "connect", func() (int, error) {
				_, _, n, err := newConns(r, hello[echoSNI], 1, d)
				return n, err
			})
			if err != nil {
				return nil, err
			}
			res.Syscalls[name]["connect"] = c
			l, err := traced(r, cfg.Dir, "request", func() (int, error) {
				_, _, n, err := latency(r, hello[echoSNI], d)
				return n + 1, err
			})
			if err != nil {
				return nil, err
			}
			res.Syscalls[name]["request"] = l
			fmt.Fprintf(progress, "syscalls %s: %.1f per new connection, %.1f per round trip\n", name, c.PerOp(), l.PerOp())
		}
	}
	return res, nil
}

// SyscallTable renders Result.Syscalls: per relay, system calls per new connection and
// per request round trip, with the calls that make them up.
func (r *Result) SyscallTable() string {
	if len(r.Syscalls) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("| relay | syscalls per new connection | per request round trip | per new connection, by call |\n|---|---|---|---|\n")
	for _, name := range r.Relays {
		c, l := r.Syscalls[name]["connect"], r.Syscalls[name]["request"]
		var parts []string
		for _, k := range slices.SortedFunc(maps.Keys(c.ByName), func(a, b string) int { return c.ByName[b] - c.ByName[a] }) {
			if per := float64(c.ByName[k]) / float64(max(c.Ops, 1)); per >= 0.5 {
				parts = append(parts, fmt.Sprintf("%s %.1f", k, per))
			}
		}
		fmt.Fprintf(&b, "| %s | %.1f | %.1f | %s |\n", name, c.PerOp(), l.PerOp(), strings.Join(parts, ", "))
	}
	return b.String()
}

// freePort returns a loopback port nothing listens on now (the relays are told a port;
// none of them reports one it picked).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("peerbench: free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Table renders the medians as a Markdown table: one row per metric run, one column per
// relay, then the first relay's ratio to each other one and whether it is ahead of every
// peer (other gateway builds are not peers).
func (r *Result) Table() string {
	var b strings.Builder
	first := r.Relays[0]
	others := r.Relays[1:]
	b.WriteString("| measure |")
	for _, n := range r.Relays {
		fmt.Fprintf(&b, " %s |", n)
	}
	for _, o := range others {
		fmt.Fprintf(&b, " %s ÷ %s |", first, o)
	}
	fmt.Fprintf(&b, " %s ahead |\n|---|", first)
	for range len(r.Relays) + len(others) + 1 {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, m := range Metrics {
		if len(r.Values[first][m]) == 0 {
			continue // phase not run
		}
		fmt.Fprintf(&b, "| %s |", m)
		for _, n := range r.Relays {
			fmt.Fprintf(&b, " %s |", format(r.Median(n, m)))
		}
		ahead := true
		v := r.Median(first, m)
		for _, o := range others {
			w := r.Median(o, m)
			if w < 0.01 {
				b.WriteString(" — |") // no ratio to a figure that rounds to zero
			} else {
				fmt.Fprintf(&b, " %.2f |", v/w)
			}
			if strings.HasPrefix(o, Isthmus) {
				continue // another build of the gateway: a ratio, not a peer to beat
			}
			if HigherIsBetter(m) && v <= w || !HigherIsBetter(m) && v >= w {
				ahead = false
			}
		}
		mark := "no"
		if ahead {
			mark = "yes"
		}
		fmt.Fprintf(&b, " %s |\n", mark)
	}
	return b.String()
}

// format prints a figure with three significant digits or more.
func format(v float64) string {
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}
