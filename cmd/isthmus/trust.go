package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// newTrustCommand groups the CA and bundle commands. They work on files and on the API
// server only; none of them talks to a running primary except rotate, which reads each
// primary's /debug/trustz to confirm a phase.
func newTrustCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "trust",
		Short: "Manage the mesh's roots of trust and per-cluster intermediate CAs",
	}
	cmd.AddCommand(newTrustInitRootCommand(), newTrustIntermediateCommand(), newTrustRotateCommand(), newTrustBundleCommand(), newTrustFederateCommand(), newTrustStatusCommand())
	return cmd
}

// newTrustInitRootCommand writes a new root to --out-dir. It refuses a directory that
// already holds a CA key, so a typo can never replace the mesh's root.
func newTrustInitRootCommand() *cobra.Command {
	var (
		td, dir string
		ttl     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "init-root --out-dir DIR",
		Short: "Create a root CA (ECDSA P-256) for a trust domain",
		Long: `Create a root CA for a trust domain and write it in Istio's plug-in CA layout
(ca-cert.pem, ca-key.pem, root-cert.pem) to --out-dir. Keep the directory offline: it
signs every cluster's intermediate (isthmus trust intermediate).`,
		Example: "  isthmus trust init-root --trust-domain example.org --out-dir ./root",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			domain, err := mesh.ParseTrustDomain(td)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			if _, err := os.Stat(filepath.Join(dir, trust.CAKeyFile)); err == nil {
				return fmt.Errorf("%s already holds a CA key; refusing to overwrite it (choose another --out-dir)", dir)
			}
			root, err := trust.NewRoot(domain, trust.RootOptions{TTL: ttl})
			if err != nil {
				return err
			}
			if err := root.WriteDir(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "root CA for trust domain %s written to %s (valid until %s)\n", domain, dir, root.Cert.NotAfter.UTC().Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().StringVar(&td, "trust-domain", "cluster.local", "trust domain of the root")
	cmd.Flags().StringVar(&dir, "out-dir", "", "directory to write the root into (required)")
	cmd.Flags().DurationVar(&ttl, "ttl", 10*365*24*time.Hour, "validity of the root")
	cmd.MarkFlagRequired("out-dir")
	return cmd
}

// newTrustIntermediateCommand issues one cluster's intermediate from the root in
// --root-dir, as files (--out-dir) or as the Secret cacerts on stdout (-o), exactly one
// of the two. Unlike init-root it overwrites --out-dir: a reissued intermediate replaces
// the old one there.
func newTrustIntermediateCommand() *cobra.Command {
	var (
		rootDir, cluster, outDir, namespace string
		ttl                                 time.Duration
		out                                 printer
	)
	cmd := &cobra.Command{
		Use:   "intermediate --root-dir DIR --cluster ID",
		Short: "Issue a cluster's intermediate CA, bound to the root's trust domain",
		Long: `Issue an intermediate CA for one cluster, signed by the root in --root-dir and
name-constrained to the root's trust domain (it cannot sign identities of any other
domain). Writes Istio's plug-in CA layout to --out-dir, or prints the Secret "cacerts"
(-o yaml|json) to apply in the cluster's control-plane namespace.`,
		Example: `  isthmus trust intermediate --root-dir ./root --cluster east -o yaml | kubectl --context east apply -f -
  isthmus trust intermediate --root-dir ./root --cluster west --out-dir ./west-ca`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (outDir == "") == (out.format == "") {
				return fmt.Errorf("give either --out-dir or -o yaml|json")
			}
			if err := out.validate(); err != nil {
				return err
			}
			id, err := mesh.ParseClusterID(cluster)
			if err != nil {
				return fmt.Errorf("--cluster: %w", err)
			}
			root, err := trust.LoadDir(rootDir)
			if err != nil {
				return fmt.Errorf("%w (make a root with `isthmus trust init-root`)", err)
			}
			inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: id, TTL: ttl})
			if err != nil {
				return err
			}
			if outDir != "" {
				if err := inter.WriteDir(outDir); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "intermediate CA for cluster %s (trust domain %s) written to %s\n", id, inter.TrustDomain, outDir)
				return nil
			}
			secret, err := inter.PluggedSecret(namespace, id)
			if err != nil {
				return err
			}
			return out.print(cmd.OutOrStdout(), secret, nil)
		},
	}
	cmd.Flags().StringVar(&rootDir, "root-dir", "", "directory of the root CA (from init-root; required)")
	cmd.Flags().StringVar(&cluster, "cluster", "", "cluster the intermediate is for (required)")
	cmd.Flags().StringVar(&outDir, "out-dir", "", "write the plug-in CA files here")
	cmd.Flags().StringVar(&namespace, "namespace", "istio-system", "namespace of the printed Secret")
	cmd.Flags().DurationVar(&ttl, "ttl", 365*24*time.Hour, "validity of the intermediate (cut to the root's)")
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "print the Secret cacerts as yaml or json instead of writing files")
	cmd.MarkFlagRequired("root-dir")
	cmd.MarkFlagRequired("cluster")
	return cmd
}

// newTrustRotateCommand maps its flags to trust.RotationConfig and runs trust.Rotate.
// Every --ca-dir must name a cluster that also has a --primary and must hold a valid CA,
// checked before the rotation starts, so that a wrong flag cannot leave it half-done.
func newTrustRotateCommand() *cobra.Command {
	var (
		caDirs, primaries []string
		peers             []string
		stateFile         string
		cfg               trust.RotationConfig
	)
	cmd := &cobra.Command{
		Use:   "rotate --ca-dir CLUSTER=DIR... --primary CLUSTER=HOST:PORT... --state FILE",
		Short: "Replace the mesh's root without downtime: publish, reissue, retire",
		Long: `Replace the root every cluster's intermediate chains to, without a failed handshake:

  publish   the new root joins every CA's root-cert.pem; workloads get both roots at
            their next renewal. Held for --publish.
  reissue   every cluster gets a new intermediate from the new root (both roots still
            trusted); leaves renew under it. Held for --reissue.
  retire    the old root leaves root-cert.pem.

Each phase is written to every --ca-dir, then confirmed on every primary's /debug/trustz
(the primaries reload their CA directory by themselves) before its hold starts. Progress
is kept in --state (which holds the new root's key: keep it private); run the same command
again to resume an interrupted rotation.`,
		Example: `  isthmus trust rotate --state rotation.json \
    --ca-dir cluster-1=/etc/isthmus/ca-1 --primary cluster-1=10.0.0.5:15014 \
    --ca-dir cluster-2=/etc/isthmus/ca-2 --primary cluster-2=10.0.1.5:15014`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			urls := map[mesh.ClusterID]string{}
			for _, p := range primaries {
				id, addr, err := clusterPair("--primary", p)
				if err != nil {
					return err
				}
				urls[id] = "http://" + addr + "/debug/trustz"
			}
			for _, d := range caDirs {
				id, dir, err := clusterPair("--ca-dir", d)
				if err != nil {
					return err
				}
				if _, ok := urls[id]; !ok {
					return fmt.Errorf("--ca-dir %s: no --primary %s=HOST:PORT to confirm each phase on", d, id)
				}
				if _, err := trust.LoadDir(dir); err != nil {
					return fmt.Errorf("--ca-dir %s: %w", d, err)
				}
				cfg.Stores = append(cfg.Stores, trust.DirStore{ID: id, Dir: dir})
			}
			if len(cfg.Stores) == 0 {
				return fmt.Errorf("name every cluster's CA with --ca-dir CLUSTER=DIR")
			}
			if stateFile == "" {
				return fmt.Errorf("--state FILE is required (it makes the rotation resumable)")
			}
			cfg.StateFile = stateFile
			if len(peers) > 0 {
				if cfg.Peers, cfg.PeerRoots, err = peerRoots(peers); err != nil {
					return err
				}
			}
			client := &http.Client{Timeout: 5 * time.Second}
			cfg.Status = func(ctx context.Context, id mesh.ClusterID) (trust.TrustStatus, error) {
				return trust.FetchStatus(ctx, client, urls[id])
			}
			start := time.Now()
			cfg.Progress = func(s string) { fmt.Fprintf(cmd.OutOrStdout(), "[%s] %s\n", time.Since(start).Round(time.Second), s) }
			return trust.Rotate(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringSliceVar(&caDirs, "ca-dir", nil, "CLUSTER=DIR: a cluster's plug-in CA directory (repeatable)")
	f.StringSliceVar(&primaries, "primary", nil, "CLUSTER=HOST:PORT: the HTTP address of the primary serving that CA (repeatable)")
	f.StringVar(&stateFile, "state", "", "file that records progress (resume by running again)")
	f.StringSliceVar(&peers, "peer-primary", nil, "NAME=HOST:PORT: the HTTP address of a primary of another trust domain federated with this one; each phase waits until it holds the new bundle (repeatable)")
	// Leaves live 24 h by default and renew at half-life, so 13 h reaches every workload.
	f.DurationVar(&cfg.Publish, "publish", 13*time.Hour, "how long the new root is published before intermediates are reissued (at least half the leaf TTL)")
	f.DurationVar(&cfg.Reissue, "reissue", 13*time.Hour, "how long leaves get to renew under the new root before the old one is retired")
	f.DurationVar(&cfg.CheckTimeout, "check-timeout", 2*time.Minute, "how long to wait for every primary to serve a phase")
	return cmd
}

// clusterPair splits CLUSTER=VALUE, the form of every repeatable per-cluster flag, with
// the cluster ID parsed and the flag named in the error.
func clusterPair(flag, s string) (mesh.ClusterID, string, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || v == "" {
		return "", "", fmt.Errorf("%s %q: want CLUSTER=VALUE", flag, s)
	}
	id, err := mesh.ParseClusterID(k)
	if err != nil {
		return "", "", fmt.Errorf("%s %q: %w", flag, s, err)
	}
	return id, v, nil
}
