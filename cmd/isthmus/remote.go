package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
)

// newRemoteSecretCommand groups the remote-secret commands.
func newRemoteSecretCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "remote-secret",
		Short: "Make the credentials a primary uses to watch a remote cluster",
	}
	cmd.AddCommand(newRemoteSecretCreateCommand())
	return cmd
}

// newRemoteSecretCreateCommand runs remote.Create against the remote cluster and prints
// the Secret to stdout (progress to stderr), so that its output can be piped straight
// into kubectl apply in the primary's cluster.
func newRemoteSecretCreateCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, name string
		opts                          remote.CreateOptions
		out                           printer
	)
	cmd := &cobra.Command{
		Use:   "create --name CLUSTER_ID",
		Short: "Create a least-privilege reader in a remote cluster and print its Istio-format remote secret",
		Long: `Create a least-privilege reader in a remote cluster and print its remote secret.

In the cluster selected by --kubeconfig/--context this creates (or refreshes) a service
account that may only list and watch services, EndpointSlices, pods, nodes, namespaces and
multi-cluster service exports, and create TokenReviews; requests a token for it; and prints
a Secret in the format istioctl writes (label istio/multiCluster=true, annotation
networking.istio.io/cluster, one kubeconfig under the cluster ID). Apply the output in the
primary's cluster. Running it again issues a new token and resets the RBAC rules.

--rights istio grants what istiod's remote reader needs instead (the reader's rights plus
list and watch of Secrets and CustomResourceDefinitions, and of ConfigMaps in --namespace,
which must be istiod's system namespace), so that one secret serves an Isthmus primary and
istiod alike; it reads every Secret of the cluster, so it is not the default. Running
create again with the default rights takes them away.`,
		Example: `  isthmus remote-secret create --kubeconfig remote.kubeconfig --name cluster-2 | kubectl --kubeconfig primary.kubeconfig apply -f -
  isthmus remote-secret create --context east --name east --server https://api.east.example.com:6443
  isthmus remote-secret create --kubeconfig remote.kubeconfig --name cluster-2 --rights istio | kubectl --kubeconfig istiod-cluster.kubeconfig apply -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out.format == "" {
				out.format = "yaml" // a secret is applied, not read as a table
			}
			if err := out.validate(); err != nil {
				return err
			}
			id, err := mesh.ParseClusterID(name)
			if err != nil {
				return fmt.Errorf("--name: %w", err)
			}
			opts.Cluster = id
			rc, err := kubeConfig(kubeconfig, kubeContext)
			if err != nil {
				return fmt.Errorf("the remote cluster: %w", err)
			}
			cs, err := kubernetes.NewForConfig(rc)
			if err != nil {
				return err
			}
			created, err := remote.Create(cmd.Context(), cs, rc, opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "reader %s/%s ready in %s; token valid until %s\n",
				opts.Namespace, opts.ServiceAccount, rc.Host, created.Expires.UTC().Format(time.RFC3339))
			return out.print(cmd.OutOrStdout(), created.Secret, nil)
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the remote cluster (default: $KUBECONFIG or ~/.kube/config)")
	f.StringVar(&kubeContext, "context", "", "context in the kubeconfig to use")
	f.StringVar(&name, "name", "", "cluster ID the primary will know this cluster by (required)")
	f.StringVar(&opts.Namespace, "namespace", remote.DefaultNamespace, "namespace of the reader service account and of the secret")
	f.StringVar(&opts.ServiceAccount, "service-account", remote.DefaultServiceAccount, "name of the reader service account")
	f.StringVar(&opts.Server, "server", "", "API server URL the primary should use, when it differs from the kubeconfig's")
	f.StringVar(&opts.Type, "type", remote.TypeRemote, "remote: a cluster the primary discovers; config: the config cluster of an external control plane (also lists and watches Istio config, and the secrets of --namespace)")
	f.StringVar(&opts.Rights, "rights", remote.RightsIsthmus, "isthmus: what an Isthmus primary reads (least privilege); istio: what istiod's remote reader reads as well (Secrets, CRDs, ConfigMaps in --namespace), for running or migrating to istiod")
	f.StringVar(&opts.TLSServerName, "tls-server-name", "", "server name to verify the API server certificate against")
	f.DurationVar(&opts.TokenDuration, "token-duration", remote.DefaultTokenDuration, "requested token lifetime")
	f.StringVarP(&out.format, "output", "o", "yaml", "output format: yaml or json")
	cmd.MarkFlagRequired("name")
	return cmd
}
