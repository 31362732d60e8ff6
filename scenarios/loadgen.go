package scenarios

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
)

// CallRecord is one call of a workload's load generator.
type CallRecord struct {
	// Seq numbers the generator's calls from 1, in the order they started.
	Seq uint64 `json:"seq"`
	// Start is when the call started; LatencyMicros how long it took to answer or fail.
	Start         time.Time `json:"start"`
	LatencyMicros int64     `json:"latencyUs"`
	// Cluster and Pod answered; Peer is the address the connection went to (a pod, or a
	// gateway). Empty for a failed call.
	Cluster string `json:"cluster,omitempty"`
	Pod     string `json:"pod,omitempty"`
	Peer    string `json:"peer,omitempty"`
	// Error is the failed call's error; empty when it succeeded.
	Error string `json:"error,omitempty"`
}

// LoadRecords is the answer of a workload's /load/records endpoint: the calls recorded
// after the asked-for position, in the order they finished.
type LoadRecords struct {
	Target  string       `json:"target"`
	Running bool         `json:"running"`
	Records []CallRecord `json:"records"`
	// Next is the position to ask for next time (after=Next).
	Next uint64 `json:"next"`
	// Dropped counts records discarded because nobody collected them in time.
	Dropped int `json:"dropped,omitempty"`
}

// maxRecords bounds a generator's uncollected records (about 20 MB); older ones are
// dropped and counted, so a runner that stops collecting cannot grow the workload.
const maxRecords = 200_000

// generators are a workload's load generators, one per target.
type generators struct {
	w *workload

	calls *prometheus.CounterVec
	reg   *prometheus.Registry

	mu sync.Mutex
	// byTarget holds the running generators; guarded by mu.
	byTarget map[string]*generator
}

// generator makes calls to one target at a steady rate until stopped.
type generator struct {
	target  string
	rate    int
	timeout time.Duration
	cancel  context.CancelFunc
	done    chan struct{}

	mu sync.Mutex
	// seq numbers started calls; records are the finished ones not yet collected, records[0]
	// at position base (positions count finished calls from 0); dropped counts records
	// discarded at maxRecords. All guarded by mu.
	seq     uint64
	records []CallRecord
	base    uint64
	dropped int
}

func newGenerators(w *workload) *generators {
	g := &generators{w: w, byTarget: map[string]*generator{}, reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_workload_load_calls_total",
			Help: "Calls of the load generator by target and outcome (ok or error)."}, []string{"target", "outcome"})}
	g.reg.MustRegister(g.calls, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return g
}

// routes mounts /load/start, /load/records, /load/stop and /metrics:
//
//	POST /load/start?target=HOST:PORT&rate=N&timeout=D   start (or replace) a generator
//	GET  /load/records?target=HOST:PORT&after=N          calls recorded after position N; those before are forgotten
//	POST /load/stop[?target=HOST:PORT]                   stop one or every generator, in-flight calls finish
func (g *generators) routes(mux *http.ServeMux) {
	mux.HandleFunc("POST /load/start", func(rw http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		target := q.Get("target")
		if _, _, err := net.SplitHostPort(target); err != nil {
			http.Error(rw, "target: want <hostname>:<port>", http.StatusBadRequest)
			return
		}
		rate, err := strconv.Atoi(q.Get("rate"))
		if err != nil || rate < 1 || rate > 1000 {
			http.Error(rw, "rate: want calls per second from 1 to 1000", http.StatusBadRequest)
			return
		}
		timeout, err := time.ParseDuration(q.Get("timeout"))
		if err != nil || timeout <= 0 || timeout > time.Minute {
			http.Error(rw, "timeout: want a duration up to 1m", http.StatusBadRequest)
			return
		}
		if err := g.start(target, rate, timeout); err != nil {
			http.Error(rw, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintln(rw, "started")
	})
	mux.HandleFunc("GET /load/records", func(rw http.ResponseWriter, r *http.Request) {
		target := r.URL.Query().Get("target")
		after, _ := strconv.ParseUint(r.URL.Query().Get("after"), 10, 64)
		g.mu.Lock()
		gen, ok := g.byTarget[target]
		g.mu.Unlock()
		if !ok {
			http.Error(rw, "no load generator for "+target, http.StatusNotFound)
			return
		}
		rw.Header().Set("Content-Type", "application/json")
		json.NewEncoder(rw).Encode(gen.take(after))
	})
	mux.HandleFunc("POST /load/stop", func(rw http.ResponseWriter, r *http.Request) {
		g.stop(r.URL.Query().Get("target"))
		fmt.Fprintln(rw, "stopped")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.reg, promhttp.HandlerOpts{}))
}

// start starts a generator for target, replacing a running one (whose records go).
func (g *generators) start(target string, rate int, timeout time.Duration) error {
	cc, err := g.w.channel(target)
	if err != nil {
		return err
	}
	g.stop(target)
	ctx, cancel := context.WithCancel(context.Background())
	gen := &generator{target: target, rate: rate, timeout: timeout, cancel: cancel, done: make(chan struct{})}
	g.mu.Lock()
	g.byTarget[target] = gen
	g.mu.Unlock()
	go gen.run(ctx, testgrpc.NewTestServiceClient(cc), g.calls)
	return nil
}

// stop stops target's generator, or every one for "", and waits for their calls. The
// stopped generators' records stay readable.
func (g *generators) stop(target string) {
	g.mu.Lock()
	var gens []*generator
	for t, gen := range g.byTarget {
		if target == "" || t == target {
			gens = append(gens, gen)
		}
	}
	g.mu.Unlock()
	for _, gen := range gens {
		gen.cancel()
		<-gen.done
	}
}

// run starts a call every 1/rate seconds, each in its own goroutine so that a slow call
// never lowers the rate, with at most rate×timeout×2 calls in flight; a tick that finds
// that many is recorded as a failed call.
func (gen *generator) run(ctx context.Context, client testgrpc.TestServiceClient, calls *prometheus.CounterVec) {
	defer close(gen.done)
	var wg sync.WaitGroup
	defer wg.Wait()
	limit := make(chan struct{}, max(10, int(2*float64(gen.rate)*gen.timeout.Seconds())))
	tick := time.NewTicker(time.Second / time.Duration(gen.rate))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		seq := gen.next()
		select {
		case limit <- struct{}{}:
		default:
			gen.record(CallRecord{Seq: seq, Start: time.Now(), Error: fmt.Sprintf("not started: %d calls already in flight", cap(limit))})
			calls.WithLabelValues(gen.target, "error").Inc()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-limit }()
			rec := gen.call(client, seq)
			outcome := "ok"
			if rec.Error != "" {
				outcome = "error"
			}
			calls.WithLabelValues(gen.target, outcome).Inc()
			gen.record(rec)
		}()
	}
}

// call makes one call through the channel's xDS-resolved endpoints. It does not use ctx:
// a call started before the generator stops is finished and recorded.
func (gen *generator) call(client testgrpc.TestServiceClient, seq uint64) CallRecord {
	var p peer.Peer
	start := time.Now()
	cctx, cancel := context.WithTimeout(context.Background(), gen.timeout)
	r, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{}, grpc.Peer(&p))
	cancel()
	rec := CallRecord{Seq: seq, Start: start, LatencyMicros: time.Since(start).Microseconds()}
	if err != nil {
		rec.Error = err.Error()
		return rec
	}
	rec.Cluster, rec.Pod = r.GetServerId(), r.GetHostname()
	if p.Addr != nil {
		rec.Peer = p.Addr.String()
	}
	return rec
}

func (gen *generator) next() uint64 {
	gen.mu.Lock()
	defer gen.mu.Unlock()
	gen.seq++
	return gen.seq
}

func (gen *generator) record(rec CallRecord) {
	gen.mu.Lock()
	defer gen.mu.Unlock()
	if len(gen.records) >= maxRecords {
		gen.records = gen.records[1:]
		gen.base++
		gen.dropped++
	}
	gen.records = append(gen.records, rec)
}

// take returns the records from position after on and forgets those before it, which
// the caller has.
func (gen *generator) take(after uint64) LoadRecords {
	gen.mu.Lock()
	defer gen.mu.Unlock()
	out := LoadRecords{Target: gen.target, Dropped: gen.dropped}
	select {
	case <-gen.done:
	default:
		out.Running = true
	}
	if after > gen.base {
		n := min(after-gen.base, uint64(len(gen.records)))
		clear(gen.records[:n])
		gen.records = gen.records[n:]
		gen.base += n
	}
	out.Records = append([]CallRecord{}, gen.records...)
	out.Next = gen.base + uint64(len(gen.records))
	return out
}
