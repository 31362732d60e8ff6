package scenarios

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// Phase names an expectation can use: PhaseBefore, "during NAME", "after NAME" (NAME a
// fault's name), or PhaseAll.
const (
	// PhaseBefore is the load before the first fault.
	PhaseBefore = "before"
	// PhaseAll matches every phase.
	PhaseAll = "all"
)

// PhaseExpectation is what must hold for one client cluster's calls to one service during
// a phase: "during gw2-down, cluster-1's calls to echo succeed from cluster-1 only".
type PhaseExpectation struct {
	// Phase is "before", "during NAME" (every phase in which fault NAME is active),
	// "after NAME" (the quiet phase that follows fault NAME's end) or "all".
	Phase string `json:"phase"`
	// From is the client's cluster; Service is "<name>.<namespace>".
	From    string `json:"from"`
	Service string `json:"service"`
	// Reach, when set, lists the clusters that must answer the judged calls (each at least
	// once, by the path its network implies); every other cluster must not answer. An empty
	// list means nobody may answer. Unset means not checked.
	Reach []string `json:"reach,omitempty"`
	// Settle is how long into the phase the mesh gets to converge: calls started earlier
	// are counted and shown but not judged ("after restart both answer within 10s" is
	// settle: 10s). Until, when set, ends the judged window that long into the phase.
	Settle Duration `json:"settle,omitzero"`
	Until  Duration `json:"until,omitzero"`
	// MaxFailed is how many judged calls may fail; default 0, -1 for not checked.
	MaxFailed int `json:"maxFailed,omitempty"`
	// MaxP99, when set, bounds the judged calls' 99th-percentile latency.
	MaxP99 Duration `json:"maxP99,omitzero"`
}

// phaseFault returns the fault a "during"/"after" phase name names.
func phaseFault(phase string) (kind, fault string) {
	kind, fault, _ = strings.Cut(phase, " ")
	return kind, fault
}

// validatePhases checks t.Phases against the clusters, services and faults.
func (t *Topology) validatePhases(add func(string, ...any), clusters map[string]ClusterSpec, services map[string]WorkloadSpec) {
	faults := map[string]bool{}
	for _, f := range t.Faults {
		faults[f.Name] = true
	}
	for i, e := range t.Phases {
		place := fmt.Sprintf("phases[%d]", i)
		switch kind, fault := phaseFault(e.Phase); {
		case e.Phase == PhaseBefore || e.Phase == PhaseAll:
		case (kind == "during" || kind == "after") && fault != "":
			if !faults[fault] {
				add("%s.phase: %q names no fault (have %s)", place, e.Phase, strings.Join(slices.Sorted(maps.Keys(faults)), ", "))
			}
		default:
			add("%s.phase: %q (want %q, %q, \"during NAME\" or \"after NAME\")", place, e.Phase, PhaseBefore, PhaseAll)
		}
		if _, ok := clusters[e.From]; !ok {
			add("%s.from: unknown cluster %q", place, e.From)
		}
		w, ok := services[e.Service]
		if !ok {
			add("%s.service: unknown service %q (want <name>.<namespace> of a workload)", place, e.Service)
		}
		for _, c := range e.Reach {
			if _, known := clusters[c]; !known {
				add("%s.reach: unknown cluster %q", place, c)
			} else if ok && w.Replicas[c] == 0 {
				add("%s.reach: %q runs no replica of %s", place, c, e.Service)
			}
		}
		if e.Settle.Duration < 0 || e.Until.Duration < 0 || e.MaxP99.Duration < 0 {
			add("%s: settle, until and maxP99 must not be negative", place)
		}
		if e.Until.Duration > 0 && e.Until.Duration <= e.Settle.Duration {
			add("%s.until: %s is not after settle %s, so no call would be judged", place, e.Until.Duration, e.Settle.Duration)
		}
		if e.MaxFailed < -1 {
			add("%s.maxFailed: %d (want 0 or more, or -1 for not checked)", place, e.MaxFailed)
		}
	}
}

// Call is one call of the load, as the runner collected it.
type Call struct {
	From    string        `json:"from"`
	Service string        `json:"service"`
	Start   time.Time     `json:"start"`
	Latency time.Duration `json:"latency"`
	// Cluster answered, by Path ("direct" or "gateway <network>"); empty for a failure.
	Cluster string `json:"cluster,omitempty"`
	Path    string `json:"path,omitempty"`
	Error   string `json:"error,omitempty"`
}

// FaultEvent is what the scheduler did with one fault, in times since the load started.
type FaultEvent struct {
	Fault FaultSpec `json:"fault"`
	// Applied is when applying the fault began and Restoring when its restoration began:
	// the boundaries of its phase. Restored is when the restoration had finished (a
	// restarted component ready, a rotation done).
	Applied   Duration `json:"applied"`
	Restoring Duration `json:"restoring"`
	Restored  Duration `json:"restored"`
	// Error says why applying or restoring failed.
	Error string `json:"error,omitempty"`
}

// Phase is one interval of a run: before any fault, during one or more, or after one.
type Phase struct {
	// Name is "before", "during A[+B]" or "after A".
	Name string `json:"name"`
	// Active are the faults in effect; After is the fault whose end began a quiet phase.
	Active []string `json:"active,omitempty"`
	After  string   `json:"after,omitempty"`
	// Start and End are offsets from the start of the load.
	Start Duration `json:"start"`
	End   Duration `json:"end"`
	// Restored, in an after phase, is when its fault's restoration had finished (the
	// phase starts when it began). An expectation's settle counts from then: the mesh
	// cannot converge before the part is back, and how long an API server takes to start
	// on a loaded machine is not the mesh's promise.
	Restored Duration `json:"restored,omitzero"`
}

// matches reports whether an expectation's phase name selects p.
func (p Phase) matches(name string) bool {
	kind, fault := phaseFault(name)
	switch {
	case name == PhaseAll:
		return true
	case name == PhaseBefore:
		return len(p.Active) == 0 && p.After == ""
	case kind == "during":
		return slices.Contains(p.Active, fault)
	case kind == "after":
		return len(p.Active) == 0 && p.After == fault
	}
	return false
}

// buildPhases cuts [0, length) at every fault's application and restoration.
func buildPhases(length time.Duration, events []FaultEvent) []Phase {
	cuts := []time.Duration{0, length}
	for _, e := range events {
		cuts = append(cuts, e.Applied.Duration, e.Restoring.Duration)
	}
	slices.Sort(cuts)
	cuts = slices.Compact(cuts)
	var phases []Phase
	for i := 0; i+1 < len(cuts); i++ {
		from, to := cuts[i], cuts[i+1]
		if from >= length {
			break
		}
		p := Phase{Start: Duration{from}, End: Duration{min(to, length)}}
		lastEnd := time.Duration(-1)
		for _, e := range events {
			if e.Applied.Duration <= from && from < e.Restoring.Duration {
				p.Active = append(p.Active, e.Fault.Name)
			}
			if e.Restoring.Duration <= from && e.Restoring.Duration > lastEnd {
				p.After, lastEnd = e.Fault.Name, e.Restoring.Duration
				p.Restored = e.Restored
			}
		}
		switch {
		case len(p.Active) > 0:
			p.Name, p.After, p.Restored = "during "+strings.Join(p.Active, "+"), "", Duration{}
		case p.After != "":
			p.Name = "after " + p.After
		default:
			p.Restored = Duration{}
			p.Name = PhaseBefore
		}
		if n := len(phases); n > 0 && phases[n-1].Name == p.Name && slices.Equal(phases[n-1].Active, p.Active) {
			phases[n-1].End = p.End
			continue
		}
		phases = append(phases, p)
	}
	return phases
}

// CellTimeline is one client cluster's calls to one service, phase by phase.
type CellTimeline struct {
	From    string       `json:"from"`
	Service string       `json:"service"`
	Phases  []PhaseStats `json:"phases"`
	Passed  bool         `json:"passed"`
}

// PhaseStats is what a cell's calls did in one phase, and the verdict of the
// expectations that apply to it.
type PhaseStats struct {
	Phase string `json:"phase"`
	// Start and End are offsets from the start of the load.
	Start  Duration `json:"start"`
	End    Duration `json:"end"`
	Calls  int      `json:"calls"`
	Failed int      `json:"failed"`
	// P50 and P99 are the latencies of every call of the phase, failures included.
	P50 Duration `json:"p50"`
	P99 Duration `json:"p99"`
	// Answered counts the answers per cluster and path.
	Answered []HopCount `json:"answered,omitempty"`
	// Errors are the distinct errors of failed calls, the most frequent first (at most 3).
	Errors []string `json:"errors,omitempty"`
	// Expectations are the applied expectations, written out; empty when none applies.
	Expectations []string `json:"expectations,omitempty"`
	Passed       bool     `json:"passed"`
	Reasons      []string `json:"reasons,omitempty"`
}

// HopCount is how many answers came from a cluster by a path, and when the first came.
type HopCount struct {
	Hop
	Calls int `json:"calls"`
	// First is when the first of these calls started, from the start of the phase: how
	// long a cluster took to answer again after a fault.
	First Duration `json:"first"`
}

// String writes the count, and the first answer's offset when it came a second or more
// into the phase.
func (h HopCount) String() string {
	if h.First.Duration >= time.Second {
		return fmt.Sprintf("%s %d from +%s", h.Hop, h.Calls, round(h.First.Duration))
	}
	return fmt.Sprintf("%s %d", h.Hop, h.Calls)
}

// Evaluate groups calls into each cell's phases and judges them against the phase
// expectations. It is pure, so a negative control re-judges the same measurement with a
// tightened expectation. Cells are every client cluster × service.
func (t *Topology) Evaluate(expect []PhaseExpectation, phases []Phase, t0 time.Time, calls []Call) []CellTimeline {
	byCell := map[[2]string][]Call{}
	for _, c := range calls {
		k := [2]string{c.From, c.Service}
		byCell[k] = append(byCell[k], c)
	}
	var cells []CellTimeline
	for _, cl := range t.Clusters {
		for _, w := range t.Workloads {
			service := w.Service + "." + w.Namespace
			ct := CellTimeline{From: cl.Name, Service: service, Passed: true}
			cellCalls := byCell[[2]string{cl.Name, service}]
			for _, p := range phases {
				ps := phaseStats(p, t0, cellCalls)
				for _, e := range expect {
					if e.From == cl.Name && e.Service == service && p.matches(e.Phase) {
						ps.Expectations = append(ps.Expectations, e.describe())
						ps.Reasons = append(ps.Reasons, t.judge(e, p, t0, cellCalls)...)
					}
				}
				ps.Passed = len(ps.Reasons) == 0
				ct.Passed = ct.Passed && ps.Passed
				ct.Phases = append(ct.Phases, ps)
			}
			cells = append(cells, ct)
		}
	}
	return cells
}

// inWindow returns the calls that started in [p.Start+from, p.Start+to).
func inWindow(p Phase, t0 time.Time, calls []Call, from, to time.Duration) []Call {
	var out []Call
	for _, c := range calls {
		off := c.Start.Sub(t0)
		if off >= p.Start.Duration+from && off < p.Start.Duration+to && off < p.End.Duration {
			out = append(out, c)
		}
	}
	return out
}

func phaseStats(p Phase, t0 time.Time, calls []Call) PhaseStats {
	in := inWindow(p, t0, calls, 0, p.End.Duration-p.Start.Duration)
	ps := PhaseStats{Phase: p.Name, Start: p.Start, End: p.End, Calls: len(in)}
	hops, errs := map[Hop]int{}, map[string]int{}
	first := map[Hop]time.Duration{}
	var lat []time.Duration
	for _, c := range in {
		lat = append(lat, c.Latency)
		if c.Error != "" {
			ps.Failed++
			errs[c.Error]++
			continue
		}
		h := Hop{Cluster: c.Cluster, Path: c.Path}
		off := c.Start.Sub(t0) - p.Start.Duration
		if f, seen := first[h]; !seen || off < f {
			first[h] = off
		}
		hops[h]++
	}
	ps.P50, ps.P99 = Duration{percentile(lat, 50)}, Duration{percentile(lat, 99)}
	for _, h := range sortedHops(boolKeys(hops)) {
		ps.Answered = append(ps.Answered, HopCount{Hop: h, Calls: hops[h], First: Duration{first[h]}})
	}
	ps.Errors = topErrors(errs, 3)
	return ps
}

// judge returns why the calls of p's judged window break e.
func (t *Topology) judge(e PhaseExpectation, p Phase, t0 time.Time, calls []Call) []string {
	to := p.End.Duration - p.Start.Duration
	if e.Until.Duration > 0 {
		to = min(to, e.Until.Duration)
	}
	from := e.Settle.Duration
	if from > 0 && p.Restored.Duration > p.Start.Duration {
		from += p.Restored.Duration - p.Start.Duration // settle counts from the restoration's end
	}
	in := inWindow(p, t0, calls, from, to)
	where := fmt.Sprintf("%s [%s–%s]", p.Name, round(p.Start.Duration+from), round(p.Start.Duration+to))
	if len(in) == 0 {
		return []string{fmt.Sprintf("%s: no calls to judge (the phase is shorter than settle %s, or the load stopped)", where, e.Settle.Duration)}
	}
	var reasons []string
	failed, errs := 0, map[string]int{}
	answered := map[string]map[string]int{} // cluster → path → calls
	var lat []time.Duration
	for _, c := range in {
		lat = append(lat, c.Latency)
		if c.Error != "" {
			failed++
			errs[c.Error]++
			continue
		}
		if answered[c.Cluster] == nil {
			answered[c.Cluster] = map[string]int{}
		}
		answered[c.Cluster][c.Path]++
	}
	if e.MaxFailed >= 0 && failed > e.MaxFailed {
		reasons = append(reasons, fmt.Sprintf("%s: %d of %d calls failed (at most %d may), e.g. %s", where, failed, len(in), e.MaxFailed, topErrors(errs, 1)[0]))
	}
	if e.Reach != nil {
		from, _ := t.Cluster(e.From)
		for _, c := range e.Reach {
			spec, _ := t.Cluster(c)
			want := "direct"
			if spec.Network != from.Network {
				want = "gateway " + spec.Network
			}
			paths, ok := answered[c]
			switch {
			case !ok:
				reasons = append(reasons, fmt.Sprintf("%s: %s did not answer any of %d calls (expected %s)", where, c, len(in), want))
			default:
				for path, n := range paths {
					if path != want {
						reasons = append(reasons, fmt.Sprintf("%s: %s answered %d calls by %s, expected %s", where, c, n, path, want))
					}
				}
			}
		}
		for _, c := range slices.Sorted(maps.Keys(answered)) {
			if !slices.Contains(e.Reach, c) {
				n := 0
				for _, k := range answered[c] {
					n += k
				}
				reasons = append(reasons, fmt.Sprintf("%s: %s answered %d of %d calls but is not expected to", where, c, n, len(in)))
			}
		}
	}
	if e.MaxP99.Duration > 0 {
		if p99 := percentile(lat, 99); p99 > e.MaxP99.Duration {
			reasons = append(reasons, fmt.Sprintf("%s: p99 latency %s exceeds %s", where, p99.Round(10*time.Microsecond), e.MaxP99.Duration))
		}
	}
	return reasons
}

// describe writes the expectation as a line of the report.
func (e PhaseExpectation) describe() string {
	var parts []string
	if e.Reach != nil {
		parts = append(parts, "reach ["+strings.Join(e.Reach, ", ")+"]")
	}
	switch e.MaxFailed {
	case -1:
	case 0:
		parts = append(parts, "no failed call")
	default:
		parts = append(parts, fmt.Sprintf("at most %d failed", e.MaxFailed))
	}
	if e.MaxP99.Duration > 0 {
		parts = append(parts, "p99 ≤ "+e.MaxP99.Duration.String())
	}
	s := strings.Join(parts, ", ")
	if e.Settle.Duration > 0 {
		s += " after " + e.Settle.Duration.String()
	}
	if e.Until.Duration > 0 {
		s += " until " + e.Until.Duration.String()
	}
	return s
}

// percentile returns the p-th percentile (nearest rank) of ds, 0 for none.
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	return s[max(0, min(i, len(s))-1)]
}

func topErrors(errs map[string]int, n int) []string {
	keys := slices.Collect(maps.Keys(errs))
	slices.SortFunc(keys, func(a, b string) int {
		if errs[a] != errs[b] {
			return errs[b] - errs[a]
		}
		return strings.Compare(a, b)
	})
	if len(keys) > n {
		keys = keys[:n]
	}
	return keys
}

func boolKeys[K comparable](m map[K]int) map[K]bool {
	out := make(map[K]bool, len(m))
	for k := range m {
		out[k] = true
	}
	return out
}

func round(d time.Duration) string { return d.Round(100 * time.Millisecond).String() }
