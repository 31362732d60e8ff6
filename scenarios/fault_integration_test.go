package scenarios_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/scenarios"
	"github.com/isthmus-mesh/isthmus/trust"
)

// faultRun runs one fault of r's topology under load, moved to start 5 s into the load,
// with the topology's expectations for the phase before it and for its own phases, and
// logs the phase table.
func faultRun(t *testing.T, r *scenarios.Run, name string) *scenarios.FaultReport {
	t.Helper()
	var (
		fault  scenarios.FaultSpec
		found  bool
		expect []scenarios.PhaseExpectation
	)
	for _, f := range r.Topology.Faults {
		if f.Name == name {
			fault, found = f, true
		}
	}
	if !found {
		t.Fatalf("topology %s has no fault %s", r.Topology.Name, name)
	}
	fault.Start.Duration = 5 * time.Second
	for _, e := range r.Topology.Phases {
		if e.Phase == scenarios.PhaseBefore || strings.HasSuffix(e.Phase, " "+name) {
			expect = append(expect, e)
		}
	}
	start := time.Now()
	rep, err := r.RunFaults(context.Background(), scenarios.FaultOptions{Faults: []scenarios.FaultSpec{fault}, Expect: expect,
		Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rep.WriteTable(&b)
	t.Logf("%s under load in %.1fs:\n%s", name, time.Since(start).Seconds(), b.String())
	return rep
}

// tightened re-judges rep's measurement with one more expectation, beyond what the model
// promises, and requires it to fail with a reason containing want: the negative control
// that shows the measurement is real.
func tightened(t *testing.T, r *scenarios.Run, rep *scenarios.FaultReport, extra scenarios.PhaseExpectation, want string) {
	t.Helper()
	neg := *rep
	neg.Judge(r.Topology, []scenarios.PhaseExpectation{extra})
	var reasons []string
	for _, c := range neg.Cells {
		for _, p := range c.Phases {
			reasons = append(reasons, p.Reasons...)
		}
	}
	if neg.Passed || !strings.Contains(strings.Join(reasons, "\n"), want) {
		t.Fatalf("tightened expectation %+v: passed=%v, reasons %q; want a failure with %q", extra, neg.Passed, reasons, want)
	}
	t.Logf("negative control fails as it must: %s", strings.Join(reasons, "; "))
}

// loggedBetween reports whether the slog text log at path has a line with msg whose time
// is in [from, to].
func loggedBetween(path, msg string, from, to time.Time) bool {
	data, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, msg) {
			continue
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		if at, err := time.Parse(time.RFC3339Nano, ts); err == nil && !at.Before(from) && !at.After(to) {
			return true
		}
	}
	return false
}

// waitStreams waits until cluster's primary serves at least n authenticated xDS streams
// (its isthmus_primary_connected_proxies gauge), or fails the test after within.
func waitStreams(t *testing.T, r *scenarios.Run, cluster string, n int, within time.Duration) {
	t.Helper()
	url := "http://" + r.Primaries[cluster].Addresses["http"] + "/metrics"
	var last string
	for deadline := time.Now().Add(within); ; time.Sleep(200 * time.Millisecond) {
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			last = "no isthmus_primary_connected_proxies gauge"
			for _, line := range strings.Split(string(body), "\n") {
				if v, ok := strings.CutPrefix(line, "isthmus_primary_connected_proxies "); ok {
					if got, err := strconv.ParseFloat(strings.TrimSpace(v), 64); err == nil {
						if int(got) >= n {
							return
						}
						last = fmt.Sprintf("%d of %d streams", int(got), n)
					}
				}
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxies of %s did not reconnect to its primary within %s (%s)", cluster, within, last)
		}
	}
}

func failedCalls(rep *scenarios.FaultReport) int {
	n := 0
	for _, c := range rep.Calls {
		if c.Error != "" {
			n++
		}
	}
	return n
}

func dur(d time.Duration) scenarios.Duration { return scenarios.Duration{Duration: d} }

// TestFaultMultiNetwork: network-2's gateway killed and restarted, then network-2
// partitioned and healed, each under load, on one multi-network run.
func TestFaultMultiNetwork(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-network scenarios need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "multi-network-faults", p)

	t.Run("gateway-kill", func(t *testing.T) {
		rep := faultRun(t, r, "gw2-kill")
		if !rep.Passed {
			t.Fatal("multi-network did not keep its promise while network-2's gateway was down")
		}
		// Beyond the promise: cluster-2 stays reachable without its network's gateway.
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during gw2-kill", From: "cluster-1", Service: "echo.demo",
			Reach: []string{"cluster-1", "cluster-2"}, Settle: dur(2 * time.Second)}, "cluster-2 did not answer any of")
	})
	t.Run("partition", func(t *testing.T) {
		rep := faultRun(t, r, "net2-cut")
		if !rep.Passed {
			t.Fatal("multi-network did not keep its promise through a partition of network-2")
		}
		// Beyond the promise: no call fails while a network is cut off.
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during net2-cut", From: "cluster-1", Service: "echo.demo",
			Settle: dur(time.Second)}, "calls failed (at most 0 may)")
	})
}

// TestFaultMultiPrimary: a primary killed and restarted, an API server stopped past the
// link-health window, and a root rotation, each under load, on one multi-primary run.
func TestFaultMultiPrimary(t *testing.T) {
	p := provider(t)
	r := up(t, "multi-primary-faults", p)

	t.Run("primary-kill", func(t *testing.T) {
		rep := faultRun(t, r, "primary1-kill")
		if !rep.Passed || failedCalls(rep) != 0 {
			t.Fatalf("a call failed while cluster-1's primary was away (%d failed), though no endpoint changed", failedCalls(rep))
		}
		// Beyond the promise: the proxies of cluster-1 forget cluster-2 without their
		// primary. They do not: they keep serving their last configuration.
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during primary1-kill", From: "cluster-1", Service: "echo.demo",
			Reach: []string{"cluster-1"}}, "cluster-2 answered")
		// The proxies are back on the restarted primary, not only serving their last
		// configuration: later changes reach them (the next subtest's withdrawal does).
		// Their certificates (10 s) expired while it was away; they reconnect with the
		// renewed ones.
		// grpc-go runs one xDS stream per channel target, each on its own backoff (1 s
		// growing 1.6× to 120 s), so cluster-1's client (the primary's only proxy) is back
		// once it has one per service it calls.
		restarted := rep.Started.Add(rep.Faults[0].Restored.Duration)
		waitStreams(t, r, "cluster-1", len(r.Topology.Workloads), 2*time.Minute)
		t.Logf("cluster-1's client has its %d xDS streams on its restarted primary %.1fs after the restart",
			len(r.Topology.Workloads), time.Since(restarted).Seconds())
	})
	t.Run("apiserver-stop", func(t *testing.T) {
		rep := faultRun(t, r, "api2-stop")
		if !rep.Passed {
			t.Fatal("multi-primary did not keep its link-health promise while cluster-2's API server was stopped")
		}
		// Beyond the promise: cluster-2's endpoints are kept however long its API server
		// is away. They are withdrawn after the stale window.
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during api2-stop", From: "cluster-1", Service: "echo.demo",
			Reach: []string{"cluster-1", "cluster-2"}, Settle: dur(14 * time.Second)}, "cluster-2 did not answer any of")
	})
	t.Run("ca-unreachable", func(t *testing.T) {
		rep := faultRun(t, r, "ca1-cut")
		if !rep.Passed || failedCalls(rep) != 0 {
			t.Fatalf("%d call(s) failed while cluster-1's CA was unreachable; want none", failedCalls(rep))
		}
		ev := rep.Faults[0]
		client := r.Clients["cluster-1"]
		// The fault acted: the client's renewals failed meanwhile...
		if !loggedBetween(client.Log, "certificate request failed; keeping the current one", rep.Started.Add(ev.Applied.Duration), rep.Started.Add(ev.Restoring.Duration)) {
			t.Error("cluster-1's client never failed to renew while its CA was cut: the CA was not unreachable")
		}
		// ...and it renewed once the CA was back.
		st, err := os.Stat(filepath.Join(r.Dir, "pods", "cluster-1", client.Name, trust.AgentCertFile))
		if err != nil {
			t.Fatal(err)
		}
		if back := rep.Started.Add(ev.Restoring.Duration); !st.ModTime().After(back) {
			t.Errorf("the client's certificate was last written %s, before the CA came back at %s", st.ModTime(), back)
		}
		// Beyond the promise: cluster-1's client stops calling cluster-2 without its CA.
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during ca1-cut", From: "cluster-1", Service: "echo.demo",
			Reach: []string{"cluster-1"}}, "cluster-2 answered")
	})
	t.Run("root-rotation", func(t *testing.T) {
		rep := faultRun(t, r, "rotation")
		if !rep.Passed || failedCalls(rep) != 0 {
			t.Fatalf("%d call(s) failed during a root rotation; want none", failedCalls(rep))
		}
		// The rotation reached the workloads: every pod's anchors have lost the old root.
		old, err := os.ReadFile(r.RootCert)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range append(slices.Clone(r.Workloads), r.Clients["cluster-1"], r.Clients["cluster-2"]) {
			anchors, err := os.ReadFile(filepath.Join(r.Dir, "pods", c.Cluster, c.Name, trust.AgentRootFile))
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(anchors, bytes.TrimSpace(old)) {
				t.Errorf("%s still trusts the old root after the rotation: it did not renew under the new one", c.Name)
			}
		}
		// Beyond the promise: a rotation costs no latency at all (p99 of 1µs).
		tightened(t, r, rep, scenarios.PhaseExpectation{Phase: "during rotation", From: "cluster-1", Service: "echo.demo",
			MaxP99: dur(time.Microsecond)}, "p99 latency")
	})
}
