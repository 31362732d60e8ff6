package scenarios_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/scenarios"
)

// TestTrafficValidation checks the traffic section's problems are reported with their
// places, and that the built-in traffic scenario is valid.
func TestTrafficValidation(t *testing.T) {
	top, err := scenarios.Builtin("traffic-management")
	if err != nil {
		t.Fatal(err)
	}
	if err := top.Validate(); err != nil {
		t.Fatal(err)
	}
	top.Workloads[0].Labels["cluster-9"] = map[string]string{"app": "x"}
	tr := top.Traffic
	tr.Config += "\n---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\n"
	tr.Checks = append(tr.Checks,
		scenarios.TrafficCheck{Name: "bad", From: "cluster-9", Service: "nope.demo", Calls: 5000, Error: "Sometimes",
			Share: map[string]float64{"cluster-1": 150}, Failing: []string{"echo-cluster-1-9"}},
		scenarios.TrafficCheck{Name: "half a failover", From: "cluster-1", Service: "echo.demo", FailoverTo: "cluster-2"},
	)
	err = top.Validate()
	var ve *scenarios.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("want a ValidationError, got %v", err)
	}
	got := strings.Join(ve.Problems, "\n")
	for _, want := range []string{
		`workloads[0].labels: unknown cluster "cluster-9"`,
		`workloads[0].labels[cluster-9]: "app" is set by the runner`,
		`traffic.config: document 2: kind "Gateway" is not VirtualService, DestinationRule or ServiceEntry`,
		`traffic.checks[8].from: unknown cluster "cluster-9"`,
		`traffic.checks[8].service: unknown service "nope.demo"`,
		`traffic.checks[8].calls: 5000 is not between 1 and 1000`,
		`traffic.checks[8].share[cluster-1]: 150 is not a percentage`,
		`traffic.checks[8].error: "Sometimes" is not a gRPC code name`,
		`traffic.checks[8].failing: no workload pod "echo-cluster-1-9"`,
		`traffic.checks[9]: a failover check needs failing, share, within and failbackWithin`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("no problem %q in:\n%s", want, got)
		}
	}
}
