package scenarios_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// buildOnce builds the isthmus binary once for the package: the local provider runs
// primaries, gateways and workloads as its processes, as users' runs do.
var (
	buildOnce  sync.Once
	isthmusBin string
	buildErr   error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if isthmusBin != "" {
		os.RemoveAll(filepath.Dir(isthmusBin))
	}
	os.Exit(code)
}

func provider(t testing.TB) *scenarios.Local {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: starts real clusters; runs without -short")
	}
	set, err := kubetest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "isthmus-scenarios-bin-")
		if err != nil {
			buildErr = err
			return
		}
		isthmusBin = filepath.Join(dir, "isthmus")
		if out, err := exec.Command("go", "build", "-o", isthmusBin, "github.com/isthmus-mesh/isthmus/cmd/isthmus").CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build isthmus: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return &scenarios.Local{Binary: isthmusBin, Kube: set}
}

// up brings a built-in scenario up and registers its teardown, which must leave no
// process behind.
func up(t *testing.T, name string, p scenarios.Provider) *scenarios.Run {
	t.Helper()
	top, err := scenarios.Builtin(name)
	if err != nil {
		t.Fatal(err)
	}
	return upTopology(t, top, p)
}

// upTopology brings top up like up.
func upTopology(t *testing.T, top *scenarios.Topology, p scenarios.Provider) *scenarios.Run {
	t.Helper()
	name := top.Name
	dir := t.TempDir()
	start := time.Now()
	r, err := scenarios.Up(context.Background(), top, p, scenarios.Options{Dir: dir, Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s up in %.1fs", name, time.Since(start).Seconds())
	t.Cleanup(func() {
		var pids []int
		for _, group := range []map[string]*scenarios.Component{r.Primaries, r.Gateways, r.Clients} {
			for _, c := range group {
				pids = append(pids, c.PID)
			}
		}
		for _, c := range r.Workloads {
			pids = append(pids, c.PID)
		}
		if err := r.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		for _, pid := range pids {
			if proc.PIDMatches(pid, "") {
				t.Errorf("process %d still runs after Close", pid)
			}
		}
		if left := processesMentioning(dir); len(left) > 0 {
			t.Errorf("processes of the run still alive after Close: %v", left)
		}
		if out, _ := exec.Command("ip", "netns", "list").Output(); bytes.Contains(out, []byte("-"+strconv.Itoa(os.Getpid())+"-")) {
			t.Errorf("network namespaces left after Close:\n%s", out)
		}
	})
	return r
}

func check(t *testing.T, r *scenarios.Run, o scenarios.CheckOptions) *scenarios.Report {
	t.Helper()
	rep, err := r.Check(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rep.WriteTable(&b)
	t.Logf("\n%s", b.String())
	return rep
}

// cell returns the report's cell from a cluster to a service.
func cell(t *testing.T, rep *scenarios.Report, from, service string) scenarios.Cell {
	t.Helper()
	for _, c := range rep.Cells {
		if c.From == from && c.Service == service {
			return c
		}
	}
	t.Fatalf("no cell %s → %s", from, service)
	return scenarios.Cell{}
}

func TestSingleClusterAndMultiPrimary(t *testing.T) {
	p := provider(t)
	for _, name := range []string{"single-cluster", "multi-primary"} {
		t.Run(name, func(t *testing.T) {
			r := up(t, name, p)
			rep := check(t, r, scenarios.CheckOptions{})
			if !rep.Passed {
				t.Fatalf("%s failed", name)
			}
			for _, c := range rep.Cells {
				for _, h := range c.Answered {
					if h.Path != "direct" {
						t.Errorf("%s → %s: %s answered by %s on a single network", c.From, c.Service, h.Cluster, h.Path)
					}
				}
			}
		})
	}
}

// TestMultiNetwork runs the multi-network scenario, then shows that the checks can fail:
// a wrong expectation, and network-2's gateway stopped.
func TestMultiNetwork(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-network scenarios need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "multi-network", p)
	rep := check(t, r, scenarios.CheckOptions{})
	if !rep.Passed {
		t.Fatal("multi-network failed")
	}
	c := cell(t, rep, "cluster-1", "echo.demo")
	if fmt.Sprint(c.Answered) != "[cluster-1 (direct) cluster-2 (gateway network-2)]" {
		t.Errorf("cluster-1's answers %v; want cluster-2 through network-2's gateway", c.Answered)
	}
	if fmt.Sprint(c.CallerIdentities) != "[spiffe://cluster.local/ns/clients/sa/client]" {
		t.Errorf("callers seen %v; want the client's identity end to end", c.CallerIdentities)
	}

	// A wrong expectation fails, naming the cell and why.
	wrong := []scenarios.Expectation{{From: "cluster-1", Service: "echo.demo", Reach: []string{"cluster-1"}}}
	rep = check(t, r, scenarios.CheckOptions{Expect: wrong, Timeout: 5 * time.Second})
	c = cell(t, rep, "cluster-1", "echo.demo")
	if rep.Passed || c.Passed || !strings.Contains(strings.Join(c.Reasons, ";"), "cluster-2 answered (gateway network-2) but is not expected to") {
		t.Fatalf("a wrong expectation passed or gave no reason: %+v", c)
	}

	// Without network-2's gateway, cluster-2 is out of cluster-1's reach; cluster-1 keeps
	// answering.
	if err := r.StopGateway("network-2"); err != nil {
		t.Fatal(err)
	}
	rep = check(t, r, scenarios.CheckOptions{Timeout: 10 * time.Second})
	c = cell(t, rep, "cluster-1", "echo.demo")
	if c.Passed || !strings.Contains(strings.Join(c.Reasons, ";"), "cluster-2 did not answer (expected gateway network-2)") {
		t.Fatalf("with the gateway stopped the cell did not fail for the right reason: %+v", c)
	}
	after := []scenarios.Expectation{
		{From: "cluster-1", Service: "echo.demo", Reach: []string{"cluster-1"}},
		{From: "cluster-2", Service: "echo.demo", Reach: []string{"cluster-1", "cluster-2"}},
	}
	if rep := check(t, r, scenarios.CheckOptions{Expect: after, Timeout: 30 * time.Second}); !rep.Passed {
		t.Fatal("the rest of the mesh did not keep working without network-2's gateway")
	}
	if err := r.RestartGateway(context.Background(), "network-2"); err != nil {
		t.Fatal(err)
	}
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("the mesh did not recover with a new gateway")
	}
}

func TestMultiNetworkNeedsNamespaces(t *testing.T) {
	p := provider(t)
	p.NoNamespaces = true
	top, _ := scenarios.Builtin("multi-network")
	_, err := scenarios.Up(context.Background(), top, p, scenarios.Options{Dir: t.TempDir()})
	if err != scenarios.ErrNeedsNamespaces {
		t.Fatalf("got %v, want ErrNeedsNamespaces", err)
	}
}

// TestSingleNetworkWithoutNamespaces runs a scenario as an unprivileged user would: pods on
// the host's address, a port each.
func TestSingleNetworkWithoutNamespaces(t *testing.T) {
	p := provider(t)
	p.NoNamespaces = true
	r := up(t, "single-cluster", p)
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("single-cluster without namespaces failed")
	}
	if a := r.Clients["cluster-1"].Addresses["pod"]; strings.HasPrefix(a, "10.1.") {
		t.Errorf("client pod at %s, in the pod CIDR; want the host's address", a)
	}
}

// processesMentioning returns the PIDs of live processes whose command line contains s.
func processesMentioning(s string) []string {
	var pids []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		pid, _ := strconv.Atoi(e.Name())
		if proc.PIDMatches(pid, s) && pid != os.Getpid() {
			pids = append(pids, e.Name())
		}
	}
	return pids
}
