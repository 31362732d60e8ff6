package scenarios_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// importProbe makes one call from a cluster's client on its long-lived channel to target
// (the channel follows xDS, as a running workload's does).
func importProbe(t *testing.T, r *scenarios.Run, from, target string) (scenarios.ProbeResult, error) {
	t.Helper()
	q := url.Values{"target": {target}, "calls": {"1"}}
	resp, err := http.Get("http://" + r.Clients[from].Addresses["admin"] + "/probe?" + q.Encode())
	if err != nil {
		return scenarios.ProbeResult{}, err
	}
	defer resp.Body.Close()
	var res scenarios.ProbeResult
	if resp.StatusCode != http.StatusOK {
		return res, fmt.Errorf("probe: %s", resp.Status)
	}
	return res, json.NewDecoder(resp.Body).Decode(&res)
}

// TestMultiMesh runs the multi-mesh scenario: two meshes (two clusters, trust domains,
// roots and networks) peered by token, mesh-a exporting echo.demo to mesh-b. mesh-b's
// client reaches echo.demo.svc.mesh-a.isthmus through mesh-a's gateway's federation
// listener and the server sees b.example's identity; private.demo (not exported) and
// mesh-b's local.demo (exported to nobody) are unreachable from the other mesh; each
// mesh's own services answer as before. Then, on the same clusters: unexporting echo
// makes mesh-b's calls fail with the reason; exporting it again restores them; deleting
// the peering withdraws the import and closes mesh-a's gateway to it; a new token
// restores everything; killing mesh-a's federation endpoint (its primary) makes mesh-b's
// peering FAILING and withdraws the import after the stale window, and it comes back
// with the endpoint.
func TestMultiMesh(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-mesh needs network namespaces (root)")
	}
	ctx := context.Background()
	r := up(t, "multi-mesh", p)
	rep := check(t, r, scenarios.CheckOptions{Timeout: 60 * time.Second})
	if !rep.Passed {
		t.Fatal("multi-mesh failed")
	}

	const target = "echo.demo.svc.mesh-a.isthmus:8080"
	wantCaller := "spiffe://b.example/ns/clients/sa/client"
	answers := func(what string) {
		t.Helper()
		start := time.Now()
		kubetest.Eventually(t, 60*time.Second, what, func() error {
			res, err := importProbe(t, r, "cluster-b", target)
			if err != nil {
				return err
			}
			if len(res.Answers) != 1 {
				return fmt.Errorf("no answer: %v", res.Errors)
			}
			if a := res.Answers[0]; a.Cluster != "cluster-a" || a.CallerIdentity != wantCaller {
				return fmt.Errorf("answer %+v; want cluster-a seeing %s", a, wantCaller)
			}
			return nil
		})
		t.Logf("%s: %s", what, time.Since(start).Round(time.Millisecond))
	}
	fails := func(what string) {
		t.Helper()
		start := time.Now()
		var reason string
		kubetest.Eventually(t, 60*time.Second, what, func() error {
			res, err := importProbe(t, r, "cluster-b", target)
			if err != nil {
				return err
			}
			if len(res.Answers) > 0 || len(res.Errors) == 0 {
				return fmt.Errorf("still answered by %+v", res.Answers)
			}
			reason = res.Errors[0]
			return nil
		})
		t.Logf("%s: %s; the call fails with: %s", what, time.Since(start).Round(time.Millisecond), reason)
		if !strings.Contains(reason, "echo.demo.svc.mesh-a.isthmus") {
			t.Errorf("%s: the failure %q does not name the service", what, reason)
		}
	}
	gatewayExports := func() int {
		t.Helper()
		resp, err := http.Get("http://" + r.Primaries["cluster-a"].Addresses["http"] + "/debug/registryz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v struct {
			Exports struct{ Services map[string][]uint16 }
		}
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			t.Fatal(err)
		}
		return len(v.Exports.Services)
	}

	// Unexport, export again.
	if err := r.Unexport(ctx, "mesh-a", "echo.demo"); err != nil {
		t.Fatal(err)
	}
	fails("unexported echo.demo unreachable from mesh-b")
	if err := r.Export(ctx, "mesh-a", "echo.demo", []string{"mesh-b"}); err != nil {
		t.Fatal(err)
	}
	answers("re-exported echo.demo answers mesh-b")

	// Delete the peering (both sides, as both admins would); then a new token.
	for _, d := range [][2]string{{"mesh-a", "mesh-b"}, {"mesh-b", "mesh-a"}} {
		if err := r.DeletePeering(ctx, d[0], d[1]); err != nil {
			t.Fatalf("delete %s's peering with %s: %v", d[0], d[1], err)
		}
	}
	fails("echo.demo withdrawn from mesh-b after the peering's deletion")
	kubetest.Eventually(t, 20*time.Second, "mesh-a's gateway closed to the deleted peer", func() error {
		if n := gatewayExports(); n != 0 {
			return fmt.Errorf("the gateway still routes %d exported service(s)", n)
		}
		return nil
	})
	if err := r.Peer(ctx, "mesh-b", "mesh-a"); err != nil {
		t.Fatal(err)
	}
	answers("a new peering (new token) restores echo.demo")
	if n := gatewayExports(); n != 1 {
		t.Errorf("mesh-a's gateway routes %d exported services after the new peering; want 1", n)
	}

	// mesh-a's federation endpoint killed (it runs in its primary), then back.
	env := r.Env.(interface {
		KillComponent(*scenarios.Component) error
		RestartComponent(context.Context, *scenarios.Component) error
	})
	if err := env.KillComponent(r.Primaries["cluster-a"]); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	kubetest.Eventually(t, 30*time.Second, "mesh-b's peering FAILING, imports withdrawn", func() error {
		pr, err := r.PeeringState(ctx, "mesh-b", "mesh-a")
		if err != nil {
			return err
		}
		if pr.State != federation.StateFailing || pr.Imported != 0 {
			return fmt.Errorf("peering %s with %d imports (%s)", pr.State, pr.Imported, pr.Reason)
		}
		t.Logf("mesh-b's peering: %s, %s", pr.State, pr.Reason)
		return nil
	})
	t.Logf("mesh-a's endpoint killed → FAILING and imports withdrawn in %s", time.Since(start).Round(time.Millisecond))
	fails("echo.demo withdrawn while mesh-a's endpoint is down")
	if err := env.RestartComponent(ctx, r.Primaries["cluster-a"]); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 60*time.Second, "mesh-b's peering ACTIVE again", func() error {
		pr, err := r.PeeringState(ctx, "mesh-b", "mesh-a")
		if err != nil {
			return err
		}
		if pr.State != federation.StateActive || pr.Imported != 1 {
			return fmt.Errorf("peering %s with %d imports (%s)", pr.State, pr.Imported, pr.Reason)
		}
		return nil
	})
	answers("echo.demo back once mesh-a's endpoint returned")
	if rep := check(t, r, scenarios.CheckOptions{Timeout: 60 * time.Second}); !rep.Passed {
		t.Fatal("multi-mesh failed after the faults")
	}
}
