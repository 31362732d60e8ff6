package scenarios

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// FaultOptions configures RunFaults. The zero value runs the topology's faults, load and
// phase expectations.
type FaultOptions struct {
	// Faults replace the topology's faults when set; they must pass the same validation
	// (Topology.Validate checks the topology's own; WithFaults checks these).
	Faults []FaultSpec
	// Expect replaces the topology's phase expectations when set.
	Expect []PhaseExpectation
	// Soak, when positive, runs the load for Soak and repeats the faults every cycle (the
	// faults' run length) until then, and samples every Isthmus process's memory and
	// goroutines at the start and the end.
	Soak time.Duration
	// WarmTimeout bounds the wait for every client's first successful call; default 60 s.
	WarmTimeout time.Duration
	// Progress receives one line per step; nil discards.
	Progress func(string)
}

// FaultReport is the outcome of a fault run: what was done when, and each cell's timeline.
type FaultReport struct {
	Scenario string `json:"scenario"`
	// Passed is true when every fault was applied and restored and every phase
	// expectation held.
	Passed bool `json:"passed"`
	// Started is when the measured load began; Length how long it ran.
	Started time.Time `json:"started"`
	Length  Duration  `json:"length"`
	// Rate is calls per second per client and service.
	Rate   int            `json:"rate"`
	Faults []FaultEvent   `json:"faults"`
	Phases []Phase        `json:"phases"`
	Cells  []CellTimeline `json:"cells"`
	// Processes are the Isthmus processes at the start and the end (soak runs).
	Processes []ProcessSample `json:"processes,omitempty"`
	// Calls are every measured call, for re-judging (not written out).
	Calls []Call `json:"-"`
}

// RunFaults runs the load, applies each fault at its start and restores it at its end,
// then groups the calls into phases and judges them. It returns an error only when the
// load could not run; a fault that could not be applied or restored fails the report.
func (r *Run) RunFaults(ctx context.Context, o FaultOptions) (*FaultReport, error) {
	t := r.Topology
	if o.Progress == nil {
		o.Progress = func(string) {}
	}
	if o.WarmTimeout == 0 {
		o.WarmTimeout = 60 * time.Second
	}
	faults, expect := t.Faults, t.Phases
	if o.Faults != nil {
		faults = o.Faults
	}
	if o.Expect != nil {
		expect = o.Expect
	}
	expect = r.defaultExpectations(faults, expect)
	length := (&Topology{Faults: faults, Load: t.Load}).RunLength()
	if o.Soak > 0 {
		faults, length = soakSchedule(faults, length, o.Soak), o.Soak
	}
	actions := make([]faultAction, len(faults))
	for i, f := range faults {
		a, err := r.faultAction(f)
		if err != nil {
			return nil, err
		}
		actions[i] = a
	}

	o.Progress(fmt.Sprintf("load: %d call(s)/s from every client to every service, %s per call", t.Load.Rate, t.Load.Timeout.Duration))
	l, err := r.startLoad(ctx, t.Load)
	if err != nil {
		return nil, err
	}
	defer l.stop(context.Background())
	if err := l.warm(ctx, o.WarmTimeout); err != nil {
		return nil, err
	}
	rep := &FaultReport{Scenario: t.Name, Rate: t.Load.Rate, Length: Duration{length}}
	if o.Soak > 0 {
		rep.Processes = append(rep.Processes, r.SampleProcesses(ctx, "start")...)
	}
	t0 := time.Now()
	rep.Started = t0
	o.Progress(fmt.Sprintf("measuring for %s with %d fault(s)", length, len(faults)))

	collectCtx, stopCollect := context.WithCancel(ctx)
	collected := make(chan struct{})
	go func() {
		defer close(collected)
		for {
			select {
			case <-collectCtx.Done():
				return
			case <-time.After(time.Second):
				l.collect(collectCtx)
			}
		}
	}()

	events := make([]FaultEvent, len(faults))
	var wg sync.WaitGroup
	for i, f := range faults {
		events[i].Fault = f
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.runFault(ctx, t0, f, actions[i], &events[i], o.Progress)
		}()
	}
	select {
	case <-ctx.Done():
	case <-time.After(time.Until(t0.Add(length))):
	}
	wg.Wait()
	stopCollect()
	<-collected
	if err := l.stop(context.Background()); err != nil {
		return nil, fmt.Errorf("scenarios: stop the load: %w", err)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if o.Soak > 0 {
		rep.Processes = append(rep.Processes, r.SampleProcesses(ctx, "end")...)
	}
	for _, c := range l.callsSince(t0) {
		if c.Start.Before(t0.Add(length)) {
			rep.Calls = append(rep.Calls, c)
		}
	}
	rep.Faults = events
	rep.Phases = buildPhases(length, events)
	rep.Judge(t, expect)
	return rep, nil
}

// Judge (re)evaluates the report's calls against expect, replacing its cells and verdict:
// a negative control judges the same measurement with a tightened expectation.
func (rep *FaultReport) Judge(t *Topology, expect []PhaseExpectation) {
	rep.Cells = t.Evaluate(expect, rep.Phases, rep.Started, rep.Calls)
	rep.Passed = true
	for _, e := range rep.Faults {
		rep.Passed = rep.Passed && e.Error == ""
	}
	for _, c := range rep.Cells {
		rep.Passed = rep.Passed && c.Passed
	}
}

// runFault waits for f's start, applies it, waits for its end and restores it, recording
// the times in ev.
func (r *Run) runFault(ctx context.Context, t0 time.Time, f FaultSpec, a faultAction, ev *FaultEvent, progress func(string)) {
	wait := func(at time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(time.Until(t0.Add(at))):
			return true
		}
	}
	if !wait(f.Start.Duration) {
		return
	}
	progress(fmt.Sprintf("[%s] fault %s: %s %s", round(time.Since(t0)), f.Name, f.Kind, f.Target))
	// The phase begins when applying does: a fault takes effect during its application
	// (a graceful stop, links going down one by one), and calls made meanwhile belong to it.
	ev.Applied = Duration{time.Since(t0)}
	if err := a.apply(ctx); err != nil {
		ev.Error = fmt.Sprintf("apply: %v", err)
	}
	wait(f.End())
	ev.Restoring = Duration{time.Since(t0)}
	if err := a.restore(context.WithoutCancel(ctx)); err != nil {
		ev.Error = strings.TrimPrefix(ev.Error+"; restore: "+err.Error(), "; ")
	}
	ev.Restored = Duration{time.Since(t0)}
	progress(fmt.Sprintf("[%s] fault %s: restored in %s", round(ev.Restored.Duration), f.Name, (ev.Restored.Duration - ev.Restoring.Duration).Round(time.Millisecond)))
}

// defaultExpectations adds the generic promise for every fault no expectation names:
// from 10 s after it ends, every call succeeds and every cluster the topology's
// expectations name answers (recovery within 10 s). Without any "before" expectation the
// same holds before the first fault.
func (r *Run) defaultExpectations(faults []FaultSpec, expect []PhaseExpectation) []PhaseExpectation {
	named := map[string]bool{}
	for _, e := range expect {
		named[e.Phase] = true
		if _, f := phaseFault(e.Phase); f != "" {
			named[f] = true
		}
	}
	var phases []PhaseExpectation
	if !named[PhaseBefore] {
		phases = append(phases, PhaseExpectation{Phase: PhaseBefore})
	}
	for _, f := range faults {
		if !named[f.Name] {
			named[f.Name] = true
			phases = append(phases, PhaseExpectation{Phase: "after " + f.Name, Settle: Duration{10 * time.Second}})
		}
	}
	out := slices.Clone(expect)
	for _, p := range phases {
		for _, c := range r.Topology.Clusters {
			for _, w := range r.Topology.Workloads {
				e := p
				e.From, e.Service = c.Name, w.Service+"."+w.Namespace
				e.Reach = []string{}
				for _, h := range r.expected(r.Topology.Expect, c.Name, e.Service) {
					e.Reach = append(e.Reach, h.Cluster)
				}
				out = append(out, e)
			}
		}
	}
	return out
}

// soakSchedule repeats faults every cycle, for every whole cycle that fits in length, so
// that each repetition keeps its "after" phase; the rest of length is load only.
func soakSchedule(faults []FaultSpec, cycle, length time.Duration) []FaultSpec {
	var out []FaultSpec
	for k := time.Duration(0); (k+1)*cycle <= length; k++ {
		for _, f := range faults {
			g := f
			g.Start.Duration += k * cycle
			out = append(out, g)
		}
	}
	return sortedFaults(out)
}
