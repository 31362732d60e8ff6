package scenarios

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// Optional capabilities of an Environment that faults need; a provider without one
// refuses the faults that use it before the run starts.
type (
	// ComponentRestarter starts a stopped component again with the same addresses, so its
	// clients reconnect to where they were.
	ComponentRestarter interface {
		RestartComponent(ctx context.Context, c *Component) error
	}
	// ComponentKiller kills a component at once (no graceful shutdown), as a crash does.
	// Without it a fault stops the component gracefully.
	ComponentKiller interface {
		KillComponent(c *Component) error
	}
	// APIServerController stops and restarts a cluster's API server.
	APIServerController interface {
		StopAPIServer(cluster string) error
		StartAPIServer(ctx context.Context, cluster string) error
	}
	// Partitioner cuts a network off from every other network and heals it.
	Partitioner interface {
		Partition(network string) error
		Heal(network string) error
	}
)

// faultAction is how one fault is applied and undone.
type faultAction struct {
	apply, restore func(ctx context.Context) error
}

// faultAction returns the action of f in this run, or why the environment cannot do it.
func (r *Run) faultAction(f FaultSpec) (faultAction, error) {
	unsupported := fmt.Errorf("scenarios: fault %s: the %T environment cannot %s", f.Name, r.Env, f.Kind)
	switch f.Kind {
	case FaultGatewayKill:
		return faultAction{
			apply: func(context.Context) error {
				if g := r.Gateways[f.Target]; g != nil {
					return r.kill(g)
				}
				return r.StopGateway(f.Target)
			},
			restore: func(ctx context.Context) error { return r.RestartGateway(ctx, f.Target) },
		}, nil
	case FaultPrimaryKill:
		rs, ok := r.Env.(ComponentRestarter)
		comp := r.Primaries[f.Target]
		if !ok || comp == nil {
			return faultAction{}, unsupported
		}
		return faultAction{
			apply:   func(context.Context) error { return r.kill(comp) },
			restore: func(ctx context.Context) error { return rs.RestartComponent(ctx, comp) },
		}, nil
	case FaultAPIServerStop:
		ac, ok := r.Env.(APIServerController)
		if !ok {
			return faultAction{}, unsupported
		}
		return faultAction{
			apply:   func(context.Context) error { return ac.StopAPIServer(f.Target) },
			restore: func(ctx context.Context) error { return ac.StartAPIServer(ctx, f.Target) },
		}, nil
	case FaultPartition:
		p, ok := r.Env.(Partitioner)
		if !ok {
			return faultAction{}, unsupported
		}
		return faultAction{
			apply:   func(context.Context) error { return p.Partition(f.Target) },
			restore: func(context.Context) error { return p.Heal(f.Target) },
		}, nil
	case FaultCAUnreachable:
		relay := r.caRelays[f.Target]
		if relay == nil {
			return faultAction{}, fmt.Errorf("scenarios: fault %s: no CA relay for %s (the fault must be in the topology before Up)", f.Name, f.Target)
		}
		return faultAction{
			apply:   func(context.Context) error { relay.cut(true); return nil },
			restore: func(context.Context) error { relay.cut(false); return nil },
		}, nil
	case FaultRootRotation:
		return r.rotation(f), nil
	}
	return faultAction{}, fmt.Errorf("scenarios: fault %s: unknown kind %q", f.Name, f.Kind)
}

// kill ends a component at once if the environment can, or stops it.
func (r *Run) kill(c *Component) error {
	if k, ok := r.Env.(ComponentKiller); ok {
		return k.KillComponent(c)
	}
	return c.Stop()
}

// rotation rotates the mesh's root over the run's CA directories while the fault lasts:
// its publish and reissue holds take 40% of the duration each, so that the retirement
// falls inside it on an idle machine; restore waits for the rotation to finish.
func (r *Run) rotation(f FaultSpec) faultAction {
	done := make(chan error, 1)
	return faultAction{
		apply: func(ctx context.Context) error {
			cfg := trust.RotationConfig{StateFile: filepath.Join(r.Dir, "trust", "rotation-"+strconv.FormatInt(time.Now().UnixNano(), 36)+".json"),
				Publish: f.Duration.Duration * 4 / 10, Reissue: f.Duration.Duration * 4 / 10, CheckTimeout: time.Minute,
				Status: r.trustStatus}
			for _, c := range r.Topology.Clusters {
				if dir, ok := r.CADirs[c.Name]; ok {
					cfg.Stores = append(cfg.Stores, trust.DirStore{ID: mesh.ClusterID(c.Name), Dir: dir})
				}
			}
			go func() { done <- trust.Rotate(context.WithoutCancel(ctx), cfg) }()
			return nil
		},
		restore: func(context.Context) error { return <-done },
	}
}

// trustStatus reads what a cluster's CA serves from its primary's /debug/trustz.
func (r *Run) trustStatus(ctx context.Context, id mesh.ClusterID) (trust.TrustStatus, error) {
	p := r.Primaries[string(id)]
	if p == nil {
		return trust.TrustStatus{}, fmt.Errorf("scenarios: no primary in %s", id)
	}
	return trust.FetchStatus(ctx, &http.Client{Timeout: 5 * time.Second}, "http://"+p.Addresses["http"]+"/debug/trustz")
}

// caRelay stands for the network path from a cluster's workloads to its primary's CA
// port: it forwards connections, and while cut it refuses new ones and resets open ones,
// so the CA is unreachable to workloads while the primary (and its xDS) keeps running.
type caRelay struct {
	l      net.Listener
	target string

	mu sync.Mutex
	// down and conns are guarded by mu.
	down  bool
	conns map[net.Conn]bool
}

func newCARelay(target string) (*caRelay, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("scenarios: CA relay: %w", err)
	}
	c := &caRelay{l: l, target: target, conns: map[net.Conn]bool{}}
	go c.serve()
	return c, nil
}

func (c *caRelay) addr() string { return c.l.Addr().String() }

func (c *caRelay) serve() {
	for {
		in, err := c.l.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		down := c.down
		if !down {
			c.conns[in] = true
		}
		c.mu.Unlock()
		if down {
			if tc, ok := in.(*net.TCPConn); ok {
				tc.SetLinger(0) // a reset, as a cut path's firewall answers
			}
			in.Close()
			continue
		}
		go c.relay(in)
	}
}

func (c *caRelay) relay(in net.Conn) {
	defer func() {
		c.mu.Lock()
		delete(c.conns, in)
		c.mu.Unlock()
		in.Close()
	}()
	out, err := net.DialTimeout("tcp", c.target, 5*time.Second)
	if err != nil {
		return
	}
	defer out.Close()
	c.mu.Lock()
	c.conns[out] = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.conns, out)
		c.mu.Unlock()
	}()
	go func() { io.Copy(out, in); out.Close() }()
	io.Copy(in, out)
}

// cut makes the CA unreachable (resetting every open connection), or reachable again.
func (c *caRelay) cut(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
	if down {
		for conn := range c.conns {
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0)
			}
			conn.Close()
		}
	}
}

func (c *caRelay) close() {
	c.l.Close()
	c.cut(true)
}

// ProcessSample is one Isthmus process's memory and goroutines at a moment.
type ProcessSample struct {
	// At is "start" or "end".
	At   string `json:"at"`
	Name string `json:"name"`
	Kind string `json:"kind"`
	PID  int    `json:"pid"`
	// RSSBytes is the resident set size from /proc/PID/status; Goroutines the
	// go_goroutines gauge of the process's /metrics. -1 when unreadable.
	RSSBytes   int64 `json:"rssBytes"`
	Goroutines int   `json:"goroutines"`
}

// SampleProcesses reads every Isthmus process's RSS and goroutine count.
func (r *Run) SampleProcesses(ctx context.Context, at string) []ProcessSample {
	var comps []*Component
	for _, c := range r.Topology.Clusters {
		if p := r.Primaries[c.Name]; p != nil {
			comps = append(comps, p)
		}
	}
	for _, n := range r.Topology.Networks {
		if g := r.Gateways[n.Name]; g != nil {
			comps = append(comps, g)
		}
	}
	comps = append(comps, r.Workloads...)
	for _, c := range r.Topology.Clusters {
		if cl := r.Clients[c.Name]; cl != nil {
			comps = append(comps, cl)
		}
	}
	var out []ProcessSample
	for _, c := range comps {
		s := ProcessSample{At: at, Name: c.Name, Kind: c.Kind, PID: c.PID, RSSBytes: rss(c.PID), Goroutines: -1}
		addr := c.Addresses["http"]
		if addr == "" {
			addr = c.Addresses["admin"]
		}
		s.Goroutines = goroutines(ctx, addr)
		out = append(out, s)
	}
	return out
}

// rss returns VmRSS of pid in bytes, or -1.
func rss(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err == nil {
				return kb * 1024
			}
		}
	}
	return -1
}

// goroutines reads go_goroutines from http://addr/metrics, or -1.
func goroutines(ctx context.Context, addr string) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return -1
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			if n, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
				return int(n)
			}
		}
	}
	return -1
}
