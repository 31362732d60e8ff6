package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// sniEnv makes grpc-go take the TLS server name from xDS (CDS sni), which a proxyless
// client needs to cross an SNI-routing gateway. grpc-go reads it once at start-up.
const sniEnv = "GRPC_EXPERIMENTAL_XDS_SNI"

// bootstrapEnv holds grpc-go's xDS bootstrap (the xDS server, the node, the certificate
// provider); grpc-go reads it once at start-up.
const bootstrapEnv = "GRPC_XDS_BOOTSTRAP_CONFIG"

func newWorkloadCommand() *cobra.Command {
	var (
		kubeconfig, clusterID, network, listen, netns, xdsAddr, caAddr, rootCert string
		cfg                                                                      scenarios.WorkloadConfig
	)
	cmd := &cobra.Command{
		Use:   "workload",
		Short: "Run a scenario workload: a pod's echo server with mTLS, and probes over proxyless xDS",
		Long: `Run one pod of a scenario as a process.

It requests a certificate from the control plane's CA (--ca-address) with a token for its
service account, serves gRPC with mTLS on the pod address (--listen, inside --netns when
given), then creates its Pod so that the EndpointSlice controller publishes it. Its admin
address answers /readyz and /probe?target=HOST:PORT&calls=N, which calls a service through
grpc-go's proxyless xDS client (--xds-address) and reports who answered. The scenario
runner starts these; run it by hand to add a pod to a running scenario.`,
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if cfg.Cluster, err = mesh.ParseClusterID(clusterID); err != nil {
				return fmt.Errorf("--cluster-id: %w", err)
			}
			nw, err := mesh.ParseNetworkID(network)
			if err != nil {
				return fmt.Errorf("--network: %w", err)
			}
			if cfg.Listen, err = netip.ParseAddrPort(listen); err != nil {
				return fmt.Errorf("--listen: %w", err)
			}
			// grpc-go reads its xDS bootstrap and the SNI switch from the environment at
			// start-up, so the process runs itself again with both set.
			bootstrap, err := scenarios.XDSBootstrap(xdsAddr, cfg.Cluster, nw, cfg.Namespace, cfg.Pod, cfg.Listen.Addr().String(), cfg.Dir)
			if err != nil {
				return err
			}
			if os.Getenv(sniEnv) != "true" || os.Getenv(bootstrapEnv) != string(bootstrap) {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				return syscall.Exec(exe, os.Args, append(os.Environ(), sniEnv+"=true", bootstrapEnv+"="+string(bootstrap)))
			}
			rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
			if err != nil {
				return fmt.Errorf("--kubeconfig: %w", err)
			}
			if cfg.Client, err = kubernetes.NewForConfig(rc); err != nil {
				return err
			}
			if netns != "" {
				ns, err := netlab.Open(netns)
				if err != nil {
					return fmt.Errorf("--netns: %w", err)
				}
				defer ns.Close()
				cfg.Netns = ns
			}
			pem, err := os.ReadFile(rootCert)
			if err != nil {
				return fmt.Errorf("--root-cert: %w", err)
			}
			roots := x509.NewCertPool()
			if !roots.AppendCertsFromPEM(pem) {
				return errors.New("--root-cert: no PEM certificate")
			}
			// The CA's serving certificate names the control plane as Istio's does.
			conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
				RootCAs: roots, ServerName: "istiod.istio-system.svc", MinVersion: tls.VersionTLS12})))
			if err != nil {
				return fmt.Errorf("--ca-address: %w", err)
			}
			defer conn.Close()
			cfg.CA = pb.NewIstioCertificateServiceClient(conn)
			cfg.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil)).With("pod", cfg.Pod, "cluster", cfg.Cluster)
			return scenarios.RunWorkload(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the pod's cluster")
	f.StringVar(&clusterID, "cluster-id", "", "the pod's cluster")
	f.StringVar(&network, "network", "", "the pod's network")
	f.StringVar(&cfg.Namespace, "namespace", "", "the pod's namespace")
	f.StringVar(&cfg.Pod, "pod", "", "the pod's name")
	f.StringVar(&cfg.ServiceAccount, "service-account", "", "the pod's service account (its identity)")
	f.StringVar(&cfg.App, "app", "", "the pod's app label, which its Service selects")
	f.StringVar(&listen, "listen", "", "the pod's address and gRPC port, IP:PORT")
	f.StringVar(&netns, "netns", "", "network namespace of the pod's sockets")
	f.StringVar(&xdsAddr, "xds-address", "", "the primary's xDS address")
	f.StringVar(&caAddr, "ca-address", "", "the primary's CA (CSR API) address")
	f.StringVar(&rootCert, "root-cert", "", "file of the root that signed the CA's serving certificate")
	f.StringVar(&cfg.Dir, "dir", "", "directory for the certificate files")
	f.StringVar(&cfg.AdminAddress, "admin-address", "127.0.0.1:15020", "address of /readyz and /probe")
	for _, name := range []string{"kubeconfig", "cluster-id", "network", "namespace", "pod", "service-account", "app", "listen", "xds-address", "ca-address", "root-cert", "dir"} {
		cmd.MarkFlagRequired(name)
	}
	return cmd
}
