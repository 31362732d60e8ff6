package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
)

func kubeVersion() string { return kubebin.KubernetesVersion }
func etcdVersion() string { return kubebin.EtcdVersion }

// defaultStateDir is where detached local clusters live: $ISTHMUS_STATE_DIR, else
// $XDG_STATE_HOME/isthmus/clusters, else ~/.local/state/isthmus/clusters.
func defaultStateDir() string {
	if d := os.Getenv("ISTHMUS_STATE_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "isthmus", "clusters")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return filepath.Join(os.TempDir(), "isthmus", "clusters")
	}
	return filepath.Join(home, ".local", "state", "isthmus", "clusters")
}

// newClusterCommand groups the local-cluster commands; --state-dir (default
// defaultStateDir) is where all of them find the clusters.
func newClusterCommand() *cobra.Command {
	var stateDir string
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Run real Kubernetes clusters on this machine (etcd, kube-apiserver, kube-controller-manager)",
		Long: `Run real Kubernetes clusters on this machine.

Each local cluster is etcd, kube-apiserver and kube-controller-manager built from the
Kubernetes ` + kubebin.KubernetesVersion + ` sources, plus a node agent that stands in for kubelets: Pods are
bound to one Node and reported Running and Ready with an IP, so Services get real
EndpointSlices. No containers run. The first use builds the binaries (minutes, once per
version); they are cached under the user cache directory.`,
	}
	cmd.PersistentFlags().StringVar(&stateDir, "state-dir", defaultStateDir(), "directory that holds the local clusters (env ISTHMUS_STATE_DIR)")
	cmd.AddCommand(newClusterUpCommand(&stateDir), newClusterListCommand(&stateDir), newClusterDownCommand(&stateDir), newClusterBinariesCommand(), newNodeAgentCommand())
	return cmd
}

// clusterInfo is how the CLI shows a local cluster (-o json|yaml use the field names).
type clusterInfo struct {
	Name       string    `json:"name"`
	Status     string    `json:"status"`
	URL        string    `json:"url"`
	Kubeconfig string    `json:"kubeconfig"`
	Started    time.Time `json:"started"`
}

func infoFromState(s *kubelocal.State) clusterInfo {
	return clusterInfo{Name: s.Name, Status: s.Health(), URL: s.URL, Kubeconfig: s.Kubeconfig, Started: s.Started}
}

func printClusters(w io.Writer, p printer, infos []clusterInfo) error {
	return p.print(w, map[string]any{"clusters": infos}, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "NAME\tSTATUS\tAPI SERVER\tKUBECONFIG\tAGE")
		for _, c := range infos {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", c.Name, c.Status, c.URL, c.Kubeconfig, age(c.Started))
		}
	})
}

func age(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return strconv.Itoa(int(d.Seconds())) + "s"
	case d < time.Hour:
		return strconv.Itoa(int(d.Minutes())) + "m"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d.Hours())) + "h"
	default:
		return strconv.Itoa(int(d.Hours()/24)) + "d"
	}
}

func newClusterUpCommand(stateDir *string) *cobra.Command {
	var (
		n      int
		prefix string
		out    printer
	)
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start local clusters that keep running after this command returns",
		Example: `  isthmus cluster up --clusters 2
  kubectl --kubeconfig "$(isthmus cluster list -o json | jq -r '.clusters[0].kubeconfig')" get ns`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			if n < 1 || n > 50 {
				return fmt.Errorf("--clusters must be between 1 and 50, got %d", n)
			}
			return clusterUp(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), *stateDir, prefix, n, out)
		},
	}
	cmd.Flags().IntVar(&n, "clusters", 1, "number of clusters to start")
	cmd.Flags().StringVar(&prefix, "name-prefix", "isthmus", "clusters are named <prefix>-1, <prefix>-2, ...")
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: a table)")
	return cmd
}

// clusterUp starts n more detached clusters named <prefix>-<i> beside those already in
// stateDir (names in use are skipped, never restarted), builds the binaries first if they
// are missing, and prints the new clusters. Cluster i gets pod range 10.(9+i).0.0/16 and
// zone local-<i>, so the clusters of one mesh never share pod IPs. If any fails to start,
// none is left running: their directories move to <stateDir>/.failed-<time> with the
// components' logs, where list and down do not look.
func clusterUp(ctx context.Context, stdout, stderr io.Writer, stateDir, prefix string, n int, out printer) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find the isthmus executable for the node agent: %w", err)
	}
	existing, _ := kubelocal.ListStates(stateDir)
	taken := map[string]bool{}
	for _, s := range existing {
		taken[s.Name] = true
	}
	o := kubebin.OptionsFromEnv()
	o.Progress = stderr
	set, err := kubebin.Ensure(ctx, o)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{
		Level: slog.LevelInfo,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
	cfgs := make([]kubelocal.Config, 0, n)
	for i := 1; len(cfgs) < n; i++ {
		name := prefix + "-" + strconv.Itoa(i)
		if taken[name] {
			continue // keep existing clusters; add new ones beside them
		}
		idx := i - 1
		if idx > 200 {
			return fmt.Errorf("too many clusters named %s-*; stop some with `isthmus cluster down`", prefix)
		}
		cfgs = append(cfgs, kubelocal.Config{
			Name:         name,
			Dir:          filepath.Join(stateDir, name),
			Binaries:     set,
			Detached:     true,
			AgentCommand: []string{exe, "cluster", "node-agent"},
			// Distinct pod ranges keep pod IPs unique across clusters of one mesh.
			PodCIDR: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(10 + idx%200), 0, 0}), 16),
			Region:  "local",
			Zone:    "local-" + strconv.Itoa(i),
			Log:     log,
		})
	}
	names := make([]string, len(cfgs))
	for i, c := range cfgs {
		names[i] = c.Name
	}
	fmt.Fprintf(stderr, "starting %d cluster(s): %s\n", len(cfgs), strings.Join(names, ", "))
	start := time.Now()
	clusters, err := kubelocal.StartMany(ctx, cfgs)
	if err != nil {
		// Keep the logs where list and down do not look (dot directories), and say where.
		failed := filepath.Join(stateDir, ".failed-"+time.Now().Format("20060102-150405"))
		os.MkdirAll(failed, 0o755)
		for _, c := range cfgs {
			os.RemoveAll(filepath.Join(c.Dir, "etcd"))
			os.Rename(c.Dir, filepath.Join(failed, c.Name))
		}
		return fmt.Errorf("%w\nthe components' logs are kept in %s/<cluster>/logs; fix the cause and run `isthmus cluster up` again", err, failed)
	}
	fmt.Fprintf(stderr, "%d cluster(s) ready in %s\n", len(clusters), time.Since(start).Round(10*time.Millisecond))
	// Istio's own CRDs, so that users' VirtualServices and DestinationRules are validated
	// and stored as on a cluster with Istio installed.
	for _, c := range clusters {
		if err := istiocrd.Apply(ctx, c.RESTConfig()); err != nil {
			return fmt.Errorf("cluster %s: %w (the cluster keeps running; `isthmus cluster down` removes it)", c.Name, err)
		}
	}
	fmt.Fprintf(stderr, "Istio's VirtualService and DestinationRule CRDs installed\n")
	infos := make([]clusterInfo, 0, len(clusters))
	for _, c := range clusters {
		s, err := kubelocal.LoadState(c.Dir)
		if err != nil {
			return err
		}
		infos = append(infos, infoFromState(s))
	}
	if err := printClusters(stdout, out, infos); err != nil {
		return err
	}
	if out.format == "" {
		fmt.Fprintf(stdout, "\nThe clusters keep running. Try:\n  kubectl --kubeconfig %s get nodes\n  isthmus cluster list\n  isthmus cluster down\n", infos[0].Kubeconfig)
	}
	return nil
}

// newClusterListCommand lists the detached clusters recorded in stateDir.
func newClusterListCommand(stateDir *string) *cobra.Command {
	var out printer
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List local clusters with their status, API server URL and kubeconfig",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			states, err := kubelocal.ListStates(*stateDir)
			if err != nil {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning:", err)
			}
			infos := make([]clusterInfo, 0, len(states))
			for _, s := range states {
				infos = append(infos, infoFromState(s))
			}
			if len(infos) == 0 && out.format == "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "no local clusters in %s; start some with `isthmus cluster up`\n", *stateDir)
				return nil
			}
			return printClusters(cmd.OutOrStdout(), out, infos)
		},
	}
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: a table)")
	return cmd
}

// newClusterDownCommand stops the named clusters (all without names) and removes their
// directories. It goes on past a cluster that fails to stop and reports every failure; an
// unknown name fails before anything is stopped.
func newClusterDownCommand(stateDir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "down [NAME...]",
		Short: "Stop local clusters (all of them when no name is given) and remove their data",
		RunE: func(cmd *cobra.Command, args []string) error {
			states, listErr := kubelocal.ListStates(*stateDir)
			byName := map[string]*kubelocal.State{}
			for _, s := range states {
				byName[s.Name] = s
			}
			targets := states
			if len(args) > 0 {
				targets = nil
				for _, name := range args {
					s, ok := byName[name]
					if !ok {
						return fmt.Errorf("no local cluster named %q in %s; see `isthmus cluster list`", name, *stateDir)
					}
					targets = append(targets, s)
				}
			}
			if len(targets) == 0 {
				if listErr != nil {
					return listErr
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "no local clusters in %s\n", *stateDir)
				return nil
			}
			var errs []error
			for _, s := range targets {
				if err := kubelocal.StopDetached(s); err != nil {
					errs = append(errs, err)
					continue
				}
				fmt.Fprintf(cmd.OutOrStdout(), "cluster %s stopped and removed\n", s.Name)
			}
			return errors.Join(errs...)
		},
	}
}

// newNodeAgentCommand is the process `cluster up` starts per cluster (kubelocal's
// AgentCommand): it registers the node and plays the kubelet for pods until interrupted.
func newNodeAgentCommand() *cobra.Command {
	var (
		kubeconfig, node, podCIDR, region, zone string
	)
	cmd := &cobra.Command{
		Use:    "node-agent",
		Short:  "Run the node agent of a local cluster (started by `cluster up`)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cidr, err := netip.ParsePrefix(podCIDR)
			if err != nil {
				return fmt.Errorf("--pod-cidr: %w", err)
			}
			rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
			if err != nil {
				return fmt.Errorf("--kubeconfig: %w", err)
			}
			cs, err := kubernetes.NewForConfig(rc)
			if err != nil {
				return err
			}
			agent, err := kubelocal.NewNodeAgent(kubelocal.NodeAgentConfig{
				Client: cs, NodeName: node, PodCIDR: cidr, Region: region, Zone: zone,
				Log: slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil)),
			})
			if err != nil {
				return err
			}
			return agent.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster")
	cmd.Flags().StringVar(&node, "node", "", "node name to register")
	cmd.Flags().StringVar(&podCIDR, "pod-cidr", "", "range to assign pod IPs from")
	cmd.Flags().StringVar(&region, "region", "", "topology.kubernetes.io/region of the node")
	cmd.Flags().StringVar(&zone, "zone", "", "topology.kubernetes.io/zone of the node")
	for _, f := range []string{"kubeconfig", "node", "pod-cidr"} {
		cmd.MarkFlagRequired(f)
	}
	return cmd
}

// newClusterBinariesCommand builds the cluster binaries into the cache if missing (a lock
// makes a second caller wait for the first build) and prints their paths.
func newClusterBinariesCommand() *cobra.Command {
	var out printer
	cmd := &cobra.Command{
		Use:   "binaries",
		Short: "Build (once per version) and show the etcd and Kubernetes binaries local clusters run",
		Long: `Build (once per version) and show the etcd and Kubernetes binaries local clusters run.

Binaries come from $KUBEBUILDER_ASSETS when it holds them, else from the cache
($ISTHMUS_K8S_CACHE, default <user cache dir>/isthmus/k8s). Missing ones are built from the
tools/k8s module of this checkout with the Go toolchain: about 7 minutes on 2 cores, once.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			o := kubebin.OptionsFromEnv()
			o.Progress = cmd.ErrOrStderr()
			set, err := kubebin.Ensure(cmd.Context(), o)
			if err != nil {
				return err
			}
			return out.print(cmd.OutOrStdout(), set, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "BINARY\tPATH")
				for _, name := range kubebin.All {
					fmt.Fprintf(tw, "%s\t%s\n", name, set.Path(name))
				}
			})
		},
	}
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: a table)")
	return cmd
}
