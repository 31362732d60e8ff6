package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// scenarioFlags are the flags shared by `isthmus up` and `isthmus scenario run`.
type scenarioFlags struct {
	name, file, dir string
	noNamespaces    bool
	timeout         time.Duration
}

func (f *scenarioFlags) register(cmd *cobra.Command, defaultName string) {
	fs := cmd.Flags()
	fs.StringVar(&f.name, "scenario", defaultName, "built-in scenario to run (see `isthmus scenario list`)")
	fs.StringVarP(&f.file, "filename", "f", "", "topology file to run instead of a built-in scenario")
	fs.StringVar(&f.dir, "state-dir", defaultScenarioDir(), "where runs keep their clusters, certificates and logs")
	fs.BoolVar(&f.noNamespaces, "no-namespaces", false, "run pods on this host's address (a port each) even as root (single-network scenarios only)")
	fs.DurationVar(&f.timeout, "timeout", 60*time.Second, "how long the checks wait for the mesh to converge")
}

func defaultScenarioDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "isthmus", "scenarios")
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".local", "state", "isthmus", "scenarios")
}

// topology reads the scenario the flags name (a positional name wins over --scenario).
func (f *scenarioFlags) topology(args []string) (*scenarios.Topology, error) {
	if f.file != "" {
		if len(args) > 0 {
			return nil, errors.New("give a scenario name or -f FILE, not both")
		}
		data, err := os.ReadFile(f.file)
		if err != nil {
			return nil, err
		}
		t, err := scenarios.Parse(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.file, err)
		}
		if err := t.Validate(); err != nil {
			return nil, fmt.Errorf("%s: %w", f.file, err)
		}
		return t, nil
	}
	name := f.name
	if len(args) > 0 {
		name = args[0]
	}
	return scenarios.Builtin(name)
}

// up starts t with the local provider, printing progress to w.
func (f *scenarioFlags) up(ctx context.Context, w io.Writer, t *scenarios.Topology, runDir string) (*scenarios.Run, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the isthmus executable: %w", err)
	}
	start := time.Now()
	progress := func(s string) { fmt.Fprintf(w, "[%5.1fs] %s\n", time.Since(start).Seconds(), s) }
	o := kubebin.OptionsFromEnv()
	o.Progress = w
	set, err := kubebin.Ensure(ctx, o)
	if err != nil {
		return nil, err
	}
	// A previous run's leftovers (clusters' data, certificates) never leak into this one.
	if err := os.RemoveAll(runDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		return nil, err
	}
	p := &scenarios.Local{Binary: exe, Kube: set, NoNamespaces: f.noNamespaces}
	return scenarios.Up(ctx, t, p, scenarios.Options{Dir: runDir, Progress: progress})
}

func newScenarioCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "scenario",
		Short: "List, show and run deployment-model scenarios on local clusters",
	}
	cmd.AddCommand(newScenarioListCommand(), newScenarioShowCommand(), newScenarioRunCommand())
	return cmd
}

func newScenarioListCommand() *cobra.Command {
	var out printer
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the built-in scenarios",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			type row struct {
				Name        string `json:"name"`
				Clusters    int    `json:"clusters"`
				Networks    int    `json:"networks"`
				Description string `json:"description"`
			}
			var rows []row
			for _, name := range scenarios.Builtins() {
				t, err := scenarios.Builtin(name)
				if err != nil {
					return err
				}
				rows = append(rows, row{t.Name, len(t.Clusters), len(t.Networks), t.Description})
			}
			return out.print(cmd.OutOrStdout(), rows, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "NAME\tCLUSTERS\tNETWORKS\tDESCRIPTION")
				for _, r := range rows {
					fmt.Fprintf(tw, "%s\t%d\t%d\t%s\n", r.Name, r.Clusters, r.Networks, r.Description)
				}
			})
		},
	}
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	return cmd
}

func newScenarioShowCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Print a built-in scenario's topology file",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			data, err := scenarios.BuiltinSource(args[0])
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(data)
			return err
		},
	}
}

func newScenarioRunCommand() *cobra.Command {
	var (
		f      scenarioFlags
		out    printer
		faults []string
		soak   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run [NAME]",
		Short: "Bring a scenario up, check every expectation (and its faults under load), tear it down; exit 0 only if all hold",
		Long: `Bring a scenario up on local clusters, call every service from a client in every
cluster, compare who answered, by which path and with which identities with the
topology's expectations, print the table and tear everything down.

When the topology has faults, or --fault adds some, the run then puts load on the mesh
(every client calls every service at load.rate per second through grpc-go's proxyless
xDS client), applies each fault at its start and restores it at its end, and prints a
timeline per client and service: calls, failures, p50/p99 and who answered by which
path, for the phase before the faults, during each and after each, judged against the
topology's phase expectations. A fault without expectations is expected to leave every
call succeeding from 10s after it ends.

A fault is KIND:TARGET@START+DURATION, optionally NAME=KIND:TARGET@START+DURATION:
  partition:NETWORK        every link of the network's namespace cut, then restored
  gateway-kill:NETWORK     the network's east-west gateway killed, then a new one started
  primary-kill:CLUSTER     the cluster's primary killed, then started on the same addresses
  apiserver-stop:CLUSTER   the cluster's API server stopped, then started
  ca-unreachable:CLUSTER   the path from the cluster's workloads to its CA cut, then restored
  root-rotation:mesh       the mesh's root rotated (publish, reissue, retire) within DURATION
START counts from the start of the load. Faults are validated with the topology before
anything starts.

--duration makes it a soak: the load runs that long, the faults repeat every cycle, and
the report adds the memory (RSS) and goroutines of every Isthmus process at the start
and the end.

Exit codes: 0 every expectation holds; 1 some cell or phase failed or the scenario could not start.`,
		Example: `  isthmus scenario run multi-network --fault gateway-kill:network-2@10s+15s
  isthmus scenario run multi-primary-faults -o json
  isthmus scenario run multi-network-faults --duration 10m`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			t, err := f.topology(args)
			if err != nil {
				return err
			}
			if err := addFaults(t, faults, soak); err != nil {
				return err
			}
			runDir := filepath.Join(f.dir, t.Name+"-run-"+fmt.Sprint(os.Getpid()))
			r, err := f.up(cmd.Context(), cmd.ErrOrStderr(), t, runDir)
			if err != nil {
				return err
			}
			defer r.Close()
			rep, err := r.Check(cmd.Context(), scenarios.CheckOptions{Timeout: f.timeout})
			if err != nil {
				return err
			}
			res := scenarioResult{Report: rep}
			if rep.Passed && (len(t.Faults) > 0 || soak > 0) {
				start := time.Now()
				progress := func(s string) { fmt.Fprintf(cmd.ErrOrStderr(), "[%5.1fs] %s\n", time.Since(start).Seconds(), s) }
				if res.Faults, err = r.RunFaults(cmd.Context(), scenarios.FaultOptions{Soak: soak, Progress: progress}); err != nil {
					return err
				}
			}
			if rep.Passed && t.Traffic != nil {
				start := time.Now()
				progress := func(s string) { fmt.Fprintf(cmd.ErrOrStderr(), "[%5.1fs] %s\n", time.Since(start).Seconds(), s) }
				if res.Traffic, err = r.RunTraffic(cmd.Context(), scenarios.TrafficOptions{Timeout: f.timeout, Progress: progress}); err != nil {
					return err
				}
			}
			if rep.Passed && t.Ingress != nil {
				start := time.Now()
				progress := func(s string) { fmt.Fprintf(cmd.ErrOrStderr(), "[%5.1fs] %s\n", time.Since(start).Seconds(), s) }
				if res.Ingress, err = r.RunIngress(cmd.Context(), scenarios.IngressOptions{Timeout: f.timeout, Progress: progress}); err != nil {
					return err
				}
			}
			passed := rep.Passed && (res.Faults == nil || res.Faults.Passed) && (res.Traffic == nil || res.Traffic.Passed) &&
				(res.Ingress == nil || res.Ingress.Passed)
			if passed {
				defer os.RemoveAll(runDir) // after Close; a failed run keeps its logs
			}
			if err := out.print(cmd.OutOrStdout(), res, func(tw *tabwriter.Writer) {
				rep.WriteTable(tw)
				if res.Faults != nil {
					tw.Flush()
					fmt.Fprintln(tw)
					res.Faults.WriteTable(tw)
				}
				if res.Traffic != nil {
					tw.Flush()
					fmt.Fprintln(tw)
					res.Traffic.WriteTable(tw)
				}
				if res.Ingress != nil {
					tw.Flush()
					fmt.Fprintln(tw)
					res.Ingress.WriteTable(tw)
				}
			}); err != nil {
				return err
			}
			if !passed {
				return exitError{code: 1, err: fmt.Errorf("scenario %s: expectations failed; logs are in %s", t.Name, runDir)}
			}
			return nil
		},
	}
	f.register(cmd, "multi-network")
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	cmd.Flags().StringArrayVar(&faults, "fault", nil, "[NAME=]KIND:TARGET@START+DURATION: a fault to apply under load (repeatable; see above)")
	cmd.Flags().DurationVar(&soak, "duration", 0, "soak: run the load this long, repeating the faults, and report every process's memory and goroutines")
	return cmd
}

// scenarioResult is what `scenario run` prints: the reachability matrix and, for a run
// with faults, their timeline.
type scenarioResult struct {
	*scenarios.Report
	Faults  *scenarios.FaultReport   `json:"faults,omitempty"`
	Traffic *scenarios.TrafficReport `json:"traffic,omitempty"`
	Ingress *scenarios.IngressReport `json:"ingress,omitempty"`
}

// addFaults adds the --fault specs to t and validates the whole again, so that a bad
// fault is refused with its place before anything starts.
func addFaults(t *scenarios.Topology, specs []string, soak time.Duration) error {
	if soak < 0 {
		return fmt.Errorf("--duration %s: must be positive", soak)
	}
	first := len(t.Faults)
	for _, s := range specs {
		f, err := scenarios.ParseFault(s)
		if err != nil {
			return fmt.Errorf("--fault: %w", err)
		}
		t.Faults = append(t.Faults, f)
	}
	if err := t.Validate(); err != nil {
		if len(specs) > 0 {
			return fmt.Errorf("%w\n  (faults[%d] and after are the --fault flags, in order)", err, first)
		}
		return err
	}
	if soak > 0 && soak < t.RunLength() && len(t.Faults) > 0 {
		return fmt.Errorf("--duration %s is shorter than one cycle of the faults (%s)", soak, t.RunLength())
	}
	return nil
}

// upState is what a running `isthmus up` records, so that `isthmus down` and a second
// `isthmus up` find it.
type upState struct {
	Scenario string    `json:"scenario"`
	PID      int       `json:"pid"`
	Dir      string    `json:"dir"`
	Started  time.Time `json:"started"`
	// Ready is set once the table has been printed; Summary holds it and the help.
	Ready   bool   `json:"ready"`
	Failed  string `json:"failed,omitempty"`
	Summary string `json:"summary,omitempty"`
}

const upStateFile = "up.json"

func readUpState(dir string) (*upState, error) {
	data, err := os.ReadFile(filepath.Join(dir, upStateFile))
	if err != nil {
		return nil, err
	}
	var s upState
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, upStateFile), err)
	}
	return &s, nil
}

func (s *upState) write() error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(s.Dir, upStateFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(s.Dir, upStateFile))
}

// explore describes how to look around a running scenario.
func explore(r *scenarios.Run, name string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "\nExplore it:\n")
	for _, c := range r.Env.Clusters() {
		fmt.Fprintf(&b, "  kubectl --kubeconfig %s get pods -A -o wide        # %s (%s)\n", c.Kubeconfig, c.Name, c.Network)
	}
	for _, c := range r.Topology.Clusters {
		if p, ok := r.Primaries[c.Name]; ok {
			fmt.Fprintf(&b, "  isthmus status --primary %s    # primary of %s: xDS %s, CA %s\n", p.Addresses["http"], c.Name, p.Addresses["xds"], p.Addresses["ca"])
			fmt.Fprintf(&b, "    debug: http://%s/debug/clusterz  /debug/registryz  /debug/proxyz  /metrics\n", p.Addresses["http"])
		}
	}
	for _, c := range r.Topology.Clusters {
		fmt.Fprintf(&b, "  %s's pods get xDS and certificates from: %s\n", c.Name, r.ControlPlaneOf(c.Name))
	}
	for _, n := range r.Topology.Networks {
		if g, ok := r.Gateways[n.Name]; ok {
			fmt.Fprintf(&b, "  gateway of %s at %s: http://%s/metrics\n", n.Name, g.Public, g.Addresses["http"])
		}
		if cmd := r.Env.NetworkCommand(n.Name); cmd != nil {
			fmt.Fprintf(&b, "  %s <command>    # a shell on %s\n", strings.Join(cmd, " "), n.Name)
		}
	}
	if c, ok := r.Clients[r.Topology.Clusters[0].Name]; ok && len(r.Topology.Workloads) > 0 {
		w := r.Topology.Workloads[0]
		fmt.Fprintf(&b, "  curl 'http://%s/probe?target=%s:%d&calls=10'    # call %s.%s from %s's client\n",
			c.Addresses["admin"], scenarios.Hostname(w.Service+"."+w.Namespace), w.Port, w.Service, w.Namespace, c.Cluster)
	}
	fmt.Fprintf(&b, "  logs: %s\n", filepath.Join(r.Dir, "logs"))
	fmt.Fprintf(&b, "Stop it with Ctrl-C (or `isthmus down %s` when detached).\n", name)
	return b.String()
}
