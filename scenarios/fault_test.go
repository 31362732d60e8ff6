package scenarios

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestFaultParse(t *testing.T) {
	good := []struct {
		in   string
		want FaultSpec
	}{
		{"gateway-kill:network-2@10s+15s", FaultSpec{Kind: FaultGatewayKill, Target: "network-2", Start: Duration{10 * time.Second}, Duration: Duration{15 * time.Second}}},
		{"gw=gateway-kill:network-2@0s+1m30s", FaultSpec{Name: "gw", Kind: FaultGatewayKill, Target: "network-2", Duration: Duration{90 * time.Second}}},
		{"root-rotation:mesh@500ms+20s", FaultSpec{Kind: FaultRootRotation, Target: "mesh", Start: Duration{500 * time.Millisecond}, Duration: Duration{20 * time.Second}}},
	}
	for _, c := range good {
		got, err := ParseFault(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseFault(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
	bad := map[string]string{
		"gateway-kill:network-2":          "no @START+DURATION",
		"gateway-kill@1s+2s":              "no KIND:TARGET",
		":network-2@1s+2s":                "no KIND:TARGET",
		"gateway-kill:network-2@1s":       "no +DURATION",
		"gateway-kill:network-2@soon+2s":  "start:",
		"gateway-kill:network-2@1s+ever":  "duration:",
		"Bad_Name=gateway-kill:n@1s+2s":   "name:",
		"gateway-kill:network-2@-1s+-2s":  "", // parses; Validate refuses the signs
		"primary-kill:cluster-1@1s+2s+3s": "duration:",
	}
	for in, want := range bad {
		_, err := ParseFault(in)
		if want == "" {
			if err != nil {
				t.Errorf("ParseFault(%q): %v; the form is right, Validate judges the values", in, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "KIND:TARGET@START+DURATION") {
			t.Errorf("ParseFault(%q) error %v; want one containing %q and the form", in, err, want)
		}
	}
}

const faultBase = base + `
faults:
  - {name: gw, kind: gateway-kill, target: n1, start: 5s, duration: 10s}
phases:
  - {phase: during gw, from: c2, service: echo.demo, reach: [c2]}
`

func TestFaultValidate(t *testing.T) {
	top, err := Parse([]byte(faultBase))
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatalf("valid fault topology refused: %v", err)
	}
	if top.Load.Rate != 10 || top.Load.Timeout.Duration != time.Second || top.RunLength() != 30*time.Second {
		t.Errorf("defaults: rate %d, timeout %s, run %s; want 10, 1s, 30s", top.Load.Rate, top.Load.Timeout, top.RunLength())
	}

	cases := []struct {
		name  string
		extra string
		want  []string
	}{
		{"unknown kind and component", `
faults:
  - {kind: meteor, target: n1, start: 1s, duration: 1s}
  - {kind: gateway-kill, target: n2, start: 1s, duration: 1s}
  - {kind: gateway-kill, target: n9, start: 1s, duration: 1s}
  - {kind: primary-kill, target: c9, start: 1s, duration: 1s}
  - {kind: root-rotation, target: c1, start: 1s, duration: 10s}
  - {kind: partition, target: n3, start: 1s, duration: 1s}`,
			[]string{`faults[0]: kind: unknown fault kind "meteor" (want one of apiserver-stop, ca-unreachable`,
				`faults[1]: target: network "n2" has no gateway to kill`, `faults[2]: target: unknown network "n9"`,
				`faults[3]: target: unknown cluster "c9" (have c1, c2)`, `faults[4]: target: a root rotation hits the whole mesh`,
				`faults[5]: target: unknown network "n3"`}},
		{"bad times", `
load: {duration: 20s}
faults:
  - {kind: primary-kill, target: c1, start: -1s, duration: 1s}
  - {kind: apiserver-stop, target: c1, start: 1s, duration: 0s}
  - {kind: apiserver-stop, target: c2, start: 1s, duration: -3s}
  - {kind: partition, target: n2, start: 15s, duration: 10s}`,
			[]string{"faults[0].start: -1s is negative", "faults[1].duration: 0s is not positive", "faults[2].duration: -3s is not positive",
				"faults[3]: partition-n2 ends at 25s, past the run's 20s (load.duration)"}},
		{"overlap on one component", `
faults:
  - {name: a, kind: primary-kill, target: c1, start: 0s, duration: 10s}
  - {name: b, kind: ca-unreachable, target: c1, start: 5s, duration: 10s}
  - {name: c, kind: primary-kill, target: c2, start: 5s, duration: 10s}
  - {name: d, kind: primary-kill, target: c1, start: 10s, duration: 1s}
  - {name: a, kind: apiserver-stop, target: c1, start: 5s, duration: 10s}`,
			[]string{"faults[0] and faults[1]: a (0s–10s) and b (5s–15s) overlap on the primary of c1 and cannot be scheduled",
				"faults[1] and faults[3]: b (5s–15s) and d (10s–11s) overlap on the primary of c1",
				`faults[4].name: duplicate fault name "a" (faults[0])`}},
		{"bad phases", `
faults:
  - {name: gw, kind: gateway-kill, target: n1, start: 1s, duration: 1s}
phases:
  - {phase: during nothing, from: c1, service: echo.demo}
  - {phase: sometime, from: c9, service: nope.demo}
  - {phase: after gw, from: c1, service: echo.demo, reach: [c9], settle: 5s, until: 2s, maxFailed: -2}`,
			[]string{`phases[0].phase: "during nothing" names no fault (have gw)`, `phases[1].phase: "sometime"`, `phases[1].from: unknown cluster "c9"`,
				`phases[1].service: unknown service "nope.demo"`, `phases[2].reach: unknown cluster "c9"`, "phases[2].until: 2s is not after settle 5s",
				"phases[2].maxFailed: -2"}},
		{"bad load", `
load: {rate: 5000, timeout: 2m, duration: -1s}
tuning: {certTTL: 1s, staleWindow: -1s}`,
			[]string{"load.rate: 5000", "load.timeout: 2m0s", "load.duration: -1s is negative", "tuning.certTTL: 1s", "tuning.staleWindow: -1s"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			top, err := Parse([]byte(base + c.extra))
			if err != nil {
				t.Fatal(err)
			}
			err = top.Validate()
			if err == nil {
				t.Fatal("invalid faults accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
	if _, err := Parse([]byte(base + "faults: [{kind: partition, target: n2, start: 10, duration: 1s}]")); err == nil ||
		!strings.Contains(err.Error(), `want a duration string such as "10s"`) {
		t.Errorf("a unit-less start: %v; want a refusal naming the form", err)
	}
}

func TestFaultPhases(t *testing.T) {
	ev := func(name string, a, b time.Duration) FaultEvent {
		return FaultEvent{Fault: FaultSpec{Name: name}, Applied: Duration{a}, Restoring: Duration{b}, Restored: Duration{b}}
	}
	phases := buildPhases(40*time.Second, []FaultEvent{ev("a", 5*time.Second, 15*time.Second), ev("b", 10*time.Second, 20*time.Second)})
	var got []string
	for _, p := range phases {
		got = append(got, fmt.Sprintf("%s[%s-%s]", p.Name, p.Start.Duration, p.End.Duration))
	}
	want := "before[0s-5s] during a[5s-10s] during a+b[10s-15s] during b[15s-20s] after b[20s-40s]"
	if strings.Join(got, " ") != want {
		t.Errorf("phases\n got %s\nwant %s", strings.Join(got, " "), want)
	}
	if !phases[2].matches("during a") || !phases[2].matches("during b") || phases[2].matches("after a") || !phases[4].matches("after b") || !phases[0].matches(PhaseBefore) {
		t.Error("phase matching is wrong")
	}
}

func TestFaultEvaluate(t *testing.T) {
	top, err := Parse([]byte(faultBase))
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1000, 0)
	phases := buildPhases(30*time.Second, []FaultEvent{{Fault: FaultSpec{Name: "gw"}, Applied: Duration{10 * time.Second}, Restoring: Duration{20 * time.Second}}})
	// c2's client: both clusters answer before and after; during gw, c1 stops answering
	// and the first call of the phase fails.
	var calls []Call
	for i := range 300 {
		at := time.Duration(i) * 100 * time.Millisecond
		c := Call{From: "c2", Service: "echo.demo", Start: t0.Add(at), Latency: time.Millisecond, Cluster: "c2", Path: "direct"}
		if i%2 == 1 {
			c.Cluster, c.Path = "c1", "gateway n1"
		}
		if at >= 10*time.Second && at < 20*time.Second && c.Cluster == "c1" {
			c.Cluster, c.Path = "c2", "direct"
		}
		if at == 10*time.Second {
			c = Call{From: "c2", Service: "echo.demo", Start: t0.Add(at), Latency: time.Second, Error: "deadline exceeded"}
		}
		calls = append(calls, c)
	}
	judge := func(e ...PhaseExpectation) []string {
		var reasons []string
		for _, c := range top.Evaluate(e, phases, t0, calls) {
			for _, p := range c.Phases {
				reasons = append(reasons, p.Reasons...)
			}
		}
		return reasons
	}
	pass := []PhaseExpectation{
		{Phase: PhaseBefore, From: "c2", Service: "echo.demo", Reach: []string{"c1", "c2"}},
		{Phase: "during gw", From: "c2", Service: "echo.demo", Reach: []string{"c2"}, Settle: Duration{time.Second}},
		{Phase: "during gw", From: "c2", Service: "echo.demo", Reach: []string{"c2"}, MaxFailed: 1},
		{Phase: "after gw", From: "c2", Service: "echo.demo", Reach: []string{"c1", "c2"}, MaxP99: Duration{2 * time.Millisecond}},
		{Phase: "during gw", From: "c2", Service: "echo.demo", MaxFailed: -1},
	}
	if r := judge(pass...); len(r) > 0 {
		t.Errorf("expectations that hold failed: %q", r)
	}
	fail := []struct {
		e    PhaseExpectation
		want string
	}{
		{PhaseExpectation{Phase: "during gw", From: "c2", Service: "echo.demo", Reach: []string{"c2"}}, "during gw [10s–20s]: 1 of 100 calls failed (at most 0 may), e.g. deadline exceeded"},
		{PhaseExpectation{Phase: "during gw", From: "c2", Service: "echo.demo", Reach: []string{"c1", "c2"}, Settle: Duration{time.Second}}, "c1 did not answer any of 90 calls (expected gateway n1)"},
		{PhaseExpectation{Phase: PhaseBefore, From: "c2", Service: "echo.demo", Reach: []string{"c2"}}, "c1 answered 50 of 100 calls but is not expected to"},
		{PhaseExpectation{Phase: "during gw", From: "c2", Service: "echo.demo", MaxFailed: -1, MaxP99: Duration{500 * time.Microsecond}}, "p99 latency 1ms exceeds 500µs"},
		{PhaseExpectation{Phase: "after gw", From: "c2", Service: "echo.demo", Settle: Duration{time.Minute}}, "no calls to judge"},
		{PhaseExpectation{Phase: "after gw", From: "c1", Service: "echo.demo"}, "no calls to judge"},
	}
	for _, f := range fail {
		r := judge(f.e)
		if !strings.Contains(strings.Join(r, "\n"), f.want) {
			t.Errorf("%+v: reasons %q; want %q", f.e, r, f.want)
		}
	}
	// The p99 of the during phase counts the failed call's second: 1 of 100 is the 99th
	// percentile's edge, so the phase's p99 is 1ms and its p50 1ms.
	cells := top.Evaluate(nil, phases, t0, calls)
	during := cells[1].Phases[1]
	if cells[1].From != "c2" || during.Calls != 100 || during.Failed != 1 || during.P50.Duration != time.Millisecond {
		t.Errorf("during-phase stats %+v", during)
	}
}

func TestFaultSoakSchedule(t *testing.T) {
	fs := []FaultSpec{{Name: "a", Start: Duration{5 * time.Second}, Duration: Duration{10 * time.Second}}}
	got := soakSchedule(fs, 30*time.Second, 100*time.Second)
	var starts []string
	for _, f := range got {
		starts = append(starts, f.Start.String())
	}
	if strings.Join(starts, " ") != "5s 35s 1m5s" {
		t.Errorf("soak starts %v; want 5s 35s 1m5s (a fourth cycle would not fit in 100s)", starts)
	}
	if got := soakSchedule(fs, 30*time.Second, 89*time.Second); len(got) != 2 {
		t.Errorf("%d repetitions in 89s of 30s cycles; want 2 (the third cycle's after phase would be cut short)", len(got))
	}
	if len(soakSchedule(nil, 10*time.Second, time.Minute)) != 0 {
		t.Error("no faults, no schedule")
	}
}

func FuzzParseFault(f *testing.F) {
	for _, s := range []string{"gateway-kill:network-2@10s+15s", "a=partition:n@0s+1s", "x:y@1h+1ns", "=:@+", "a=b=c:d@1s+1s"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := ParseFault(s)
		if err != nil {
			return
		}
		again, err := ParseFault(spec.String())
		if err != nil {
			t.Fatalf("%q parsed to %+v, whose String %q does not parse: %v", s, spec, spec.String(), err)
		}
		if again.Kind != spec.Kind || again.Target != spec.Target || again.Start != spec.Start || again.Duration != spec.Duration {
			t.Fatalf("%q: round trip %+v → %q → %+v", s, spec, spec.String(), again)
		}
	})
}

// TestFaultSettleCountsFromTheRestoredPart: an after phase begins when restoring does,
// but its settle counts from when the restoration finished (an API server that took 14 s
// to start on a loaded machine left 1 s of a 10 s settle for the mesh); without settle
// the whole phase is judged.
func TestFaultSettleCountsFromTheRestoredPart(t *testing.T) {
	top, err := Parse([]byte(faultBase))
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Unix(1000, 0)
	phases := buildPhases(45*time.Second, []FaultEvent{{Fault: FaultSpec{Name: "api"}, Applied: Duration{5 * time.Second},
		Restoring: Duration{20 * time.Second}, Restored: Duration{28 * time.Second}}})
	if p := phases[len(phases)-1]; p.Name != "after api" || p.Start.Duration != 20*time.Second || p.Restored.Duration != 28*time.Second {
		t.Fatalf("after phase %+v", p)
	}
	// c2's client: c1 answers again only from 33 s, 5 s after the part was back.
	var calls []Call
	for i := range 450 {
		at := time.Duration(i) * 100 * time.Millisecond
		c := Call{From: "c2", Service: "echo.demo", Start: t0.Add(at), Latency: time.Millisecond, Cluster: "c2", Path: "direct"}
		if i%2 == 1 && (at < 5*time.Second || at >= 33*time.Second) {
			c.Cluster, c.Path = "c1", "gateway n1"
		}
		calls = append(calls, c)
	}
	judge := func(e PhaseExpectation) string {
		var reasons []string
		for _, c := range top.Evaluate([]PhaseExpectation{e}, phases, t0, calls) {
			for _, p := range c.Phases {
				reasons = append(reasons, p.Reasons...)
			}
		}
		return strings.Join(reasons, "\n")
	}
	both := []string{"c1", "c2"}
	if r := judge(PhaseExpectation{Phase: "after api", From: "c2", Service: "echo.demo", Reach: both, Settle: Duration{6 * time.Second}}); r != "" {
		t.Errorf("settle 6 s from the restoration's end (34 s): %s", r)
	}
	if r := judge(PhaseExpectation{Phase: "after api", From: "c2", Service: "echo.demo", Reach: []string{"c2"}, Settle: Duration{2 * time.Second}}); !strings.Contains(r, "after api [30s–45s]: c1 answered") {
		t.Errorf("settle 2 s: want the window to start at 30 s, got %q", r)
	}
	if r := judge(PhaseExpectation{Phase: "after api", From: "c2", Service: "echo.demo", Reach: []string{"c2"}}); !strings.Contains(r, "after api [20s–45s]") {
		t.Errorf("no settle: want the whole phase judged, got %q", r)
	}
}
