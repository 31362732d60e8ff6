package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

func newAgentCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, namespace, clusterID, identity string
		caAddr, caRoot, tokenFile, sdsSocket, caServerName      string
		cfg                                                     trust.AgentConfig
	)
	cmd := &cobra.Command{
		Use:   "agent --ca-address HOST:PORT --token-file FILE --dir DIR --sds-socket PATH",
		Short: "Run a workload's trust agent: its certificate from the CA, its trust bundles, SDS for Envoy",
		Long: `Run beside a workload (as Istio's agent runs beside Envoy).

It keeps the workload's certificate current from the CA (--ca-address, authenticated with
the service-account token in --token-file, re-read for every request), watches the
cluster's bundle store (` + trust.BundleConfigMap + ` in --namespace) and keeps in --dir:
cert-chain.pem, key.pem, root-cert.pem (the local domain's roots, as the CA hands them
out) and ` + trust.AgentBundleMapFile + ` (every trusted domain's bundle, for grpc-go's
file_watcher provider). On --sds-socket it serves Envoy's Secret Discovery Service:
"default" (certificate and key) and "ROOTCA" (Envoy's SPIFFE validator with one trust
bundle per domain), pushed on every renewal and every bundle change.`,
		Example: `  isthmus agent --ca-address istiod.istio-system.svc:15012 --ca-root /var/run/secrets/istio/root-cert.pem \
    --token-file /var/run/secrets/tokens/istio-token --dir /etc/certs --sds-socket /var/run/secrets/workload-spiffe-uds/socket`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caAddr == "" || tokenFile == "" || cfg.Dir == "" || sdsSocket == "" {
				return errors.New("--ca-address, --token-file, --dir and --sds-socket are required")
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			var err error
			if clusterID != "" {
				if cfg.Cluster, err = mesh.ParseClusterID(clusterID); err != nil {
					return fmt.Errorf("--cluster-id: %w", err)
				}
			}
			if identity != "" {
				if cfg.Identity, err = mesh.ParseIdentity(identity); err != nil {
					return fmt.Errorf("--identity: %w", err)
				}
			}
			cfg.Token = func() (string, error) {
				b, err := os.ReadFile(tokenFile)
				return strings.TrimSpace(string(b)), err
			}
			tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: caServerName}
			if caRoot != "" {
				data, err := os.ReadFile(caRoot)
				if err != nil {
					return fmt.Errorf("--ca-root: %w", err)
				}
				// --ca-root and the roots the agent has received since: renewals keep
				// working after a root rotation re-issues the CA's serving certificate.
				if tc, err = trust.CAClientTLS(data, cfg.Dir, caServerName); err != nil {
					return fmt.Errorf("--ca-root: %w", err)
				}
			}
			conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
			if err != nil {
				return fmt.Errorf("--ca-address: %w", err)
			}
			defer conn.Close()
			cfg.CA = pb.NewIstioCertificateServiceClient(conn)
			var rc *rest.Config
			if kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
				rc, err = rest.InClusterConfig()
			} else {
				rc, err = kubeConfig(kubeconfig, kubeContext)
			}
			if err != nil {
				return err
			}
			client, err := kubernetes.NewForConfig(rc)
			if err != nil {
				return err
			}
			return runAgent(cmd.Context(), cfg, client, namespace, sdsSocket, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the workload's cluster (default: in-cluster, else $KUBECONFIG)")
	f.StringVar(&kubeContext, "context", "", "context in the kubeconfig")
	f.StringVar(&namespace, "namespace", "istio-system", "control-plane namespace holding the "+trust.BundleConfigMap+" ConfigMap")
	f.StringVar(&clusterID, "cluster-id", "", "the workload's cluster, sent to the CA so it reviews the token there")
	f.StringVar(&identity, "identity", "", "SPIFFE ID to name in CSRs (CAs that sign CSRs as they are need it)")
	f.StringVar(&caAddr, "ca-address", "", "the CA's CSR API address (TLS)")
	f.StringVar(&caRoot, "ca-root", "", "PEM file of the root that signs the CA's serving certificate (default: the system's roots)")
	f.StringVar(&caServerName, "ca-server-name", "istiod.istio-system.svc", "name the CA's serving certificate must have")
	f.StringVar(&tokenFile, "token-file", "", "the workload's service-account token (audience istio-ca), re-read for every request")
	f.StringVar(&cfg.Dir, "dir", "", "directory for the certificate and bundle files")
	f.StringVar(&sdsSocket, "sds-socket", "", "Unix socket path of the SDS server")
	f.DurationVar(&cfg.TTL, "ttl", 0, "certificate validity to ask for (default 24h)")
	return cmd
}

// runAgent runs the agent, the bundle store watch and the SDS server until ctx ends.
func runAgent(ctx context.Context, cfg trust.AgentConfig, client kubernetes.Interface, namespace, socket string, log *slog.Logger) error {
	bundles := trust.NewBundleSet()
	sds := trust.NewSDS(trust.SDSConfig{Bundles: bundles, Log: log})
	peers := trust.NewBundleSet()
	writer := &trust.BundleMapWriter{Path: trust.BundleMapPath(cfg.Dir), Peers: peers, Into: bundles,
		OnWrite: func([]byte) {
			if err := sds.RefreshBundles(); err != nil {
				log.Error("SDS trust bundles not refreshed; proxies keep the previous ones", "err", err)
			}
		}}
	cfg.Log = log
	cfg.OnIssue = func(in trust.Issued) {
		if len(in.Leaf.URIs) == 1 {
			if id, err := mesh.ParseIdentity(in.Leaf.URIs[0].String()); err == nil {
				// The map first, so ROOTCA's first push already has every domain.
				if err := writer.SetLocal(id.TrustDomain, in.RootPEM); err != nil {
					log.Error("bundle map not written", "err", err)
				}
			}
		}
		sds.Update(in)
	}
	agent, err := trust.NewAgent(cfg)
	if err != nil {
		return err
	}
	os.Remove(socket) // a socket left by an earlier agent
	l, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("--sds-socket: %w", err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		l.Close()
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	gs := grpc.NewServer()
	sds.Register(gctx, gs)
	log.Info("agent serving SDS", "socket", socket, "dir", cfg.Dir)
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error {
		return trust.WatchBundleStore(gctx, client, namespace, peers, func() {
			if err := writer.Update(); err != nil {
				log.Error("bundle map not written", "err", err)
			}
		}, func(err error) { log.Warn("bundle store refused; the bundles in force stay", "err", err) })
	})
	g.Go(func() error { return gs.Serve(l) })
	g.Go(func() error {
		<-gctx.Done()
		gs.Stop()
		os.Remove(socket)
		return nil
	})
	err = g.Wait()
	if errors.Is(err, context.Canceled) || errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}
