package scenarios_test

import (
	"bytes"
	"context"
	"os"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/scenarios"
)

// TestTrafficManagement runs the traffic-management scenario: two clusters on two
// networks, echo v1 in cluster-1 and v2 in cluster-2, and every traffic check measured
// from the clients (split, header routing, retries, timeout, abort, locality failover and
// back). A check with a wrong expectation then fails with its reason, so the checks can
// fail.
func TestTrafficManagement(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-network scenarios need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "traffic-management", p)
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("reachability failed before any traffic configuration")
	}
	ctx := context.Background()
	rep, err := r.RunTraffic(ctx, scenarios.TrafficOptions{Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rep.WriteTable(&b)
	t.Logf("\n%s", b.String())
	if !rep.Passed || len(rep.Checks) != len(r.Topology.Traffic.Checks) {
		t.Fatalf("traffic checks failed: %+v", rep.Checks)
	}

	// The same split judged against a wrong expectation fails, naming the share.
	wrong := r.Topology.Traffic.Checks[0]
	wrong.Share = map[string]float64{"cluster-1": 50, "cluster-2": 50}
	r.Topology.Traffic.Checks = []scenarios.TrafficCheck{wrong}
	rep, err = r.RunTraffic(ctx, scenarios.TrafficOptions{Timeout: 2e9})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Passed || !strings.Contains(strings.Join(rep.Checks[0].Reasons, ";"), "want 50% ± 5") {
		t.Fatalf("a wrong share passed or gave no reason: %+v", rep.Checks)
	}
}
