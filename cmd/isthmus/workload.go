package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/scenarios"
	"github.com/isthmus-mesh/isthmus/trust"
)

// sniEnv makes grpc-go take the TLS server name from xDS (CDS sni), which a proxyless
// client needs to cross an SNI-routing gateway. grpc-go reads it once at start-up.
const sniEnv = "GRPC_EXPERIMENTAL_XDS_SNI"

// spiffeEnv makes grpc-go's file_watcher provider read the SPIFFE bundle map
// (spiffe_trust_bundle_map_file, gRFC A87): peers are verified against their own trust
// domain's bundle. grpc-go reads it once at start-up.
const spiffeEnv = "GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE"

// bootstrapEnv holds grpc-go's xDS bootstrap (the xDS server, the node, the certificate
// provider); grpc-go reads it once at start-up.
const bootstrapEnv = "GRPC_XDS_BOOTSTRAP_CONFIG"

// newWorkloadCommand runs one scenario pod as a process (scenarios.RunWorkload). grpc-go
// reads its xDS settings from the environment once, so the command re-executes itself
// with them set (syscall.Exec keeps the pid the runner started) and only the second
// run does the work.
func newWorkloadCommand() *cobra.Command {
	var (
		kubeconfig, clusterID, network, listen, netns, xdsAddr, caAddr, rootCert string
		cfg                                                                      scenarios.WorkloadConfig
		relayAddr, locality                                                      string
		cpFromNetns                                                              bool
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
			bootstrapXDS := xdsAddr
			if cpFromNetns {
				if netns == "" || relayAddr == "" {
					return errors.New("--control-plane-from-netns needs --netns and --xds-relay-address")
				}
				_, port, err := net.SplitHostPort(relayAddr)
				if err != nil {
					return fmt.Errorf("--xds-relay-address: %w", err)
				}
				bootstrapXDS = "localhost:" + port // a name the primary's serving certificate holds
			}
			loc, err := mesh.ParseLocality(locality)
			if err != nil {
				return fmt.Errorf("--locality: %w", err)
			}
			bootstrap, err := scenarios.XDSBootstrap(bootstrapXDS, cfg.Cluster, nw, loc, cfg.Namespace, cfg.Pod, cfg.Listen.Addr().String(), cfg.Dir, cfg.CertTTL)
			if err != nil {
				return err
			}
			if os.Getenv(sniEnv) != "true" || os.Getenv(spiffeEnv) != "true" || os.Getenv(bootstrapEnv) != string(bootstrap) {
				exe, err := os.Executable()
				if err != nil {
					return err
				}
				return syscall.Exec(exe, os.Args, append(os.Environ(), sniEnv+"=true", spiffeEnv+"=true", bootstrapEnv+"="+string(bootstrap)))
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
			// The CA's serving certificate names the control plane as Istio's does; it is
			// verified against --root-cert and the roots the agent has received since, so
			// renewals keep working after a root rotation.
			caTLS, err := trust.CAClientTLS(pem, cfg.Dir, "istiod.istio-system.svc")
			if err != nil {
				return fmt.Errorf("--root-cert: %w", err)
			}
			opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(caTLS))}
			ctx := cmd.Context()
			relayErr := make(chan error, 1)
			if cpFromNetns {
				// A remote cluster's pod: the CSR API and xDS are reached from the pod's
				// network, through the gateway its istiod EndpointSlice names.
				ns := cfg.Netns
				opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return ns.Dial(ctx, a) }))
				rl, err := net.Listen("tcp", relayAddr)
				if err != nil {
					return fmt.Errorf("--xds-relay-address: %w", err)
				}
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				defer cancel()
				go func() {
					relayErr <- scenarios.Relay(ctx, rl, func(ctx context.Context) (net.Conn, error) { return ns.Dial(ctx, xdsAddr) })
				}()
			}
			conn, err := grpc.NewClient("passthrough:///"+caAddr, opts...)
			if err != nil {
				return fmt.Errorf("--ca-address: %w", err)
			}
			defer conn.Close()
			cfg.CA = pb.NewIstioCertificateServiceClient(conn)
			cfg.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil)).With("pod", cfg.Pod, "cluster", cfg.Cluster)
			err = scenarios.RunWorkload(ctx, cfg)
			select {
			case rerr := <-relayErr:
				if err == nil {
					err = rerr
				}
			default:
			}
			return err
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
	f.StringVar(&cfg.AdminAddress, "admin-address", "127.0.0.1:15020", "address of /readyz, /probe, /load/* and /metrics")
	f.DurationVar(&cfg.CertTTL, "cert-ttl", time.Hour, "validity of the certificates to ask for (renewed at half)")
	f.IntVar(&cfg.HTTPPort, "http-port", 0, "also serve HTTP (HTTP/1.1 and HTTP/2) with mTLS on the pod address at this port, answering who served the request")
	f.BoolVar(&cfg.XDSServer, "xds-server", false, "serve through grpc-go's xds.NewGRPCServer: mTLS, AuthorizationPolicy and PeerAuthentication from the primary's inbound Listener")
	f.BoolVar(&cpFromNetns, "control-plane-from-netns", false, "dial the CA and xDS from inside --netns (a remote cluster's pod reaching its primary through a gateway)")
	f.StringToStringVar(&cfg.Labels, "label", nil, "an extra pod label KEY=VALUE, e.g. version=v1 (repeatable)")
	f.StringVar(&locality, "locality", "", "the pod's locality region[/zone[/subzone]] for its xDS node")
	f.StringVar(&relayAddr, "xds-relay-address", "", "host address of the local relay grpc-go's xDS client dials, with --control-plane-from-netns")
	for _, name := range []string{"kubeconfig", "cluster-id", "network", "namespace", "pod", "service-account", "app", "listen", "xds-address", "ca-address", "root-cert", "dir"} {
		cmd.MarkFlagRequired(name)
	}
	return cmd
}
