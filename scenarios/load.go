package scenarios

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// LoadSpec is the traffic of a fault scenario: every cluster's probe client calls every
// service at Rate, each call through grpc-go's proxyless xDS client.
type LoadSpec struct {
	// Rate is calls per second from each client to each service; default 10.
	Rate int `json:"rate,omitempty"`
	// Duration is how long the load runs; default: until 15 s after the last fault.
	Duration Duration `json:"duration,omitzero"`
	// Timeout is each call's deadline; default 1 s.
	Timeout Duration `json:"timeout,omitzero"`
}

// TuningSpec sets what a deployment model's failure behaviour depends on.
type TuningSpec struct {
	// StaleWindow is how long the primaries keep an unreachable cluster's endpoints
	// before withdrawing them (`isthmus primary --stale-window`); default the primary's
	// 60 s.
	StaleWindow Duration `json:"staleWindow,omitzero"`
	// ProbeInterval is how often the primaries probe each API server; default 2 s.
	ProbeInterval Duration `json:"probeInterval,omitzero"`
	// CertTTL is the workloads' certificate validity (they renew at half of it); default
	// 1 h. A root rotation reaches workloads only through renewals.
	CertTTL Duration `json:"certTTL,omitzero"`
}

func (t *Topology) validateLoad(add func(string, ...any)) {
	if t.Load.Rate == 0 {
		t.Load.Rate = 10
	} else if t.Load.Rate < 1 || t.Load.Rate > 1000 {
		add("load.rate: %d is not between 1 and 1000 calls per second", t.Load.Rate)
	}
	if t.Load.Timeout.Duration == 0 {
		t.Load.Timeout.Duration = time.Second
	} else if t.Load.Timeout.Duration < 0 || t.Load.Timeout.Duration > time.Minute {
		add("load.timeout: %s is not between 0 and 1m", t.Load.Timeout.Duration)
	}
	if t.Load.Duration.Duration < 0 {
		add("load.duration: %s is negative", t.Load.Duration.Duration)
	}
	if d := t.Tuning.StaleWindow.Duration; d < 0 {
		add("tuning.staleWindow: %s is negative", d)
	}
	if d := t.Tuning.ProbeInterval.Duration; d < 0 {
		add("tuning.probeInterval: %s is negative", d)
	}
	if d := t.Tuning.CertTTL.Duration; d != 0 && d < 10*time.Second {
		add("tuning.certTTL: %s is shorter than 10s", d)
	}
}

// loadRun is the load of a run: a generator per client and service in the workloads, and
// a collector here pulling their records.
type loadRun struct {
	r       *Run
	streams []*loadStream
	// gateways maps each gateway's public address to its network (restarts keep it).
	gateways map[string]string
	http     *http.Client

	mu sync.Mutex
	// calls are the collected calls; guarded by mu.
	calls []Call
}

// loadStream is one client's generator for one service.
type loadStream struct {
	from, service, admin, target string
	next                         uint64
	// ok is set once the stream has had a successful call.
	ok bool
}

// startLoad starts a generator for every service in every cluster's probe client.
func (r *Run) startLoad(ctx context.Context, spec LoadSpec) (*loadRun, error) {
	l := &loadRun{r: r, http: &http.Client{Timeout: 10 * time.Second}, gateways: map[string]string{}}
	for network, g := range r.Gateways {
		l.gateways[g.Public.String()] = network
	}
	for _, c := range r.Topology.Clusters {
		client, ok := r.Clients[c.Name]
		if !ok {
			return nil, fmt.Errorf("scenarios: no probe client in %s", c.Name)
		}
		for _, w := range r.Topology.Workloads {
			service := w.Service + "." + w.Namespace
			s := &loadStream{from: c.Name, service: service, admin: client.Addresses["admin"],
				target: fmt.Sprintf("%s:%d", Hostname(service), w.Port)}
			q := url.Values{"target": {s.target}, "rate": {fmt.Sprint(spec.Rate)}, "timeout": {spec.Timeout.String()}}
			if err := l.post(ctx, s.admin, "/load/start?"+q.Encode()); err != nil {
				l.stop(context.Background())
				return nil, fmt.Errorf("scenarios: start load from %s to %s: %w", c.Name, service, err)
			}
			l.streams = append(l.streams, s)
		}
	}
	return l, nil
}

func (l *loadRun) post(ctx context.Context, admin, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+admin+path, nil)
	if err != nil {
		return err
	}
	resp, err := l.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// collect pulls every stream's new records once.
func (l *loadRun) collect(ctx context.Context) error {
	var errs []error
	for _, s := range l.streams {
		u := "http://" + s.admin + "/load/records?" + url.Values{"target": {s.target}, "after": {fmt.Sprint(s.next)}}.Encode()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		resp, err := l.http.Do(req)
		if err != nil {
			errs = append(errs, fmt.Errorf("records from %s's client: %w", s.from, err))
			continue
		}
		var recs LoadRecords
		err = json.NewDecoder(resp.Body).Decode(&recs)
		resp.Body.Close()
		if err != nil {
			errs = append(errs, fmt.Errorf("records from %s's client: %w", s.from, err))
			continue
		}
		s.next = recs.Next
		l.mu.Lock()
		for _, rec := range recs.Records {
			c := Call{From: s.from, Service: s.service, Start: rec.Start, Latency: time.Duration(rec.LatencyMicros) * time.Microsecond,
				Cluster: rec.Cluster, Error: rec.Error}
			if rec.Error == "" {
				c.Path = "direct"
				if network, ok := l.gateways[rec.Peer]; ok {
					c.Path = "gateway " + network
				}
				s.ok = true
			}
			l.calls = append(l.calls, c)
		}
		l.mu.Unlock()
	}
	return errors.Join(errs...)
}

// warm waits until every stream has had a successful call: the channels have resolved
// through xDS and connected, so the measured run starts from a working mesh.
func (l *loadRun) warm(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if err := l.collect(ctx); err != nil {
			return err
		}
		var cold []string
		for _, s := range l.streams {
			if !s.ok {
				cold = append(cold, s.from+" → "+s.service)
			}
		}
		if len(cold) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("scenarios: load: no successful call after %s from %s", timeout, strings.Join(cold, ", "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// callsSince returns the collected calls that started at or after t0.
func (l *loadRun) callsSince(t0 time.Time) []Call {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []Call
	for _, c := range l.calls {
		if !c.Start.Before(t0) {
			out = append(out, c)
		}
	}
	return out
}

// stop stops every generator (their calls in flight finish) and collects what is left.
func (l *loadRun) stop(ctx context.Context) error {
	var errs []error
	admins := map[string]bool{}
	for _, s := range l.streams {
		if !admins[s.admin] {
			admins[s.admin] = true
			if err := l.post(ctx, s.admin, "/load/stop"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, l.collect(ctx))
	return errors.Join(errs...)
}
