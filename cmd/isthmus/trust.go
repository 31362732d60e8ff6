package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

func newTrustCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "trust",
		Short: "Manage the mesh's roots of trust and per-cluster intermediate CAs",
	}
	cmd.AddCommand(newTrustInitRootCommand(), newTrustIntermediateCommand())
	return cmd
}

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
			files, err := inter.PluggedFiles()
			if err != nil {
				return err
			}
			secret := &corev1.Secret{
				TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"},
				ObjectMeta: metav1.ObjectMeta{Name: trust.SecretName, Namespace: namespace, Labels: map[string]string{"app.kubernetes.io/managed-by": "isthmus", "topology.istio.io/cluster": string(id)}},
				Data:       files,
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
