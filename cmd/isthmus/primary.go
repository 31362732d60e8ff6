package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

func newPrimaryCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, clusterID, network, trustDomain, logLevel string
		xdsAddr, httpAddr, caDir, caAddr, cmIssuer, cmNamespace            string
		cidrs, gateways                                                    []string
		cfg                                                                primary.Config
	)
	cmd := &cobra.Command{
		Use:   "primary",
		Short: "Run a control plane: watch this and remote clusters, serve xDS",
		Long: `Run a control plane.

It watches its own cluster (--kubeconfig/--context) and every remote cluster named in a
remote secret (label istio/multiCluster=true) in --namespace, or in a file of
--kubeconfig-dir, merges their services by hostname and serves them over xDS (ADS, state
of the world and delta) to Envoy, proxyless gRPC clients and gateways.

Endpoints:
  --xds-address    gRPC xDS (ADS)
  --http-address   /readyz, /metrics, /debug/clusterz, /debug/registryz,
                   /debug/config_dump?proxy=ID, /debug/proxyz`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			id, err := mesh.ParseClusterID(clusterID)
			if err != nil {
				return fmt.Errorf("--cluster-id: %w", err)
			}
			cfg.ClusterID = id
			if network != "" {
				if cfg.DefaultNetwork, err = mesh.ParseNetworkID(network); err != nil {
					return fmt.Errorf("--network: %w", err)
				}
			}
			if cfg.TrustDomain, err = mesh.ParseTrustDomain(trustDomain); err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			if cfg.NetworkCIDRs, err = parseNetworkCIDRs(cidrs); err != nil {
				return err
			}
			if cfg.Gateways, err = parseGateways(gateways); err != nil {
				return err
			}
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			cfg.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
			rc, err := kubeConfig(kubeconfig, kubeContext)
			if err != nil {
				return fmt.Errorf("the local cluster: %w", err)
			}
			if cfg.LocalClient, err = kubernetes.NewForConfig(rc); err != nil {
				return err
			}
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			cfg.Metrics = reg
			p, err := primary.New(cfg)
			if err != nil {
				return err
			}
			var ca *caServer
			if caDir != "" {
				var signer trust.Signer
				if cmIssuer != "" {
					if signer, err = certManagerSigner(rc, cmIssuer, cmNamespace, caDir); err != nil {
						return err
					}
				}
				if ca, err = newCAServer(p, cfg, caDir, reg, signer); err != nil {
					return err
				}
			} else if cmIssuer != "" {
				return errors.New("--cert-manager-issuer needs --ca-dir (its root-cert.pem names the roots cert-manager's leaves must chain to)")
			}
			return runPrimary(cmd.Context(), p, reg, xdsAddr, httpAddr, ca, caAddr, cfg.Log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster the primary runs in (default: $KUBECONFIG or ~/.kube/config)")
	f.StringVar(&kubeContext, "context", "", "context in the kubeconfig to use")
	f.StringVar(&clusterID, "cluster-id", "", "ID of the cluster the primary runs in (required)")
	f.StringVar(&cfg.Namespace, "namespace", "istio-system", "namespace of the remote secrets (and the system namespace whose network label names a cluster's network)")
	f.StringVar(&cfg.KubeconfigDir, "kubeconfig-dir", "", "directory of kubeconfig files, one per remote cluster named <cluster-id>.<ext>")
	f.StringVar(&xdsAddr, "xds-address", ":15010", "address of the xDS gRPC server")
	f.StringVar(&httpAddr, "http-address", ":15014", "address of the readiness, metrics and debug server")
	f.DurationVar(&cfg.SyncTimeout, "sync-timeout", 10*time.Second, "longest a cluster's first sync holds readiness back")
	f.DurationVar(&cfg.StaleWindow, "stale-window", 60*time.Second, "how long an unreachable cluster's endpoints are kept before they are withdrawn")
	f.DurationVar(&cfg.ProbeInterval, "probe-interval", 5*time.Second, "how often each cluster's API server is probed")
	f.DurationVar(&cfg.Debounce, "debounce", 100*time.Millisecond, "how long changes are coalesced before a push")
	f.StringVar(&cfg.Domain, "domain", "cluster.local", "cluster DNS domain")
	f.StringVar(&trustDomain, "trust-domain", "cluster.local", "trust domain of workload identities")
	f.StringVar(&network, "network", "", "network of clusters whose system namespace has no topology.istio.io/network label")
	f.StringSliceVar(&cidrs, "network-cidr", nil, "NETWORK=CIDR: endpoints in CIDR are on NETWORK unless labelled (repeatable)")
	f.StringSliceVar(&gateways, "gateway", nil, "NETWORK=IP:PORT: a gateway of NETWORK besides discovered ones (repeatable)")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowExec, "allow-exec-kubeconfigs", false, "accept remote kubeconfigs with exec credential plugins (runs commands on this host)")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowAuthProvider, "allow-auth-provider-kubeconfigs", false, "accept remote kubeconfigs with auth-provider plugins")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowFiles, "allow-file-kubeconfigs", false, "accept remote kubeconfigs that reference files on this host")
	f.StringVar(&caDir, "ca-dir", "", "plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem); serves Istio's CSR API when set")
	f.StringVar(&caAddr, "ca-address", ":15012", "address of the CA (CSR API) gRPC server, TLS")
	f.StringVar(&cmIssuer, "cert-manager-issuer", "", "sign through cert-manager: NAME or KIND/NAME of an Issuer or ClusterIssuer (workload CSRs must name their SPIFFE ID)")
	f.StringVar(&cmNamespace, "cert-manager-namespace", "istio-system", "namespace of the CertificateRequests (and of an Issuer)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.MarkFlagRequired("cluster-id")
	return cmd
}

func parseNetworkCIDRs(in []string) ([]primary.NetworkCIDR, error) {
	var out []primary.NetworkCIDR
	for _, s := range in {
		n, c, ok := strings.Cut(s, "=")
		if !ok {
			return nil, fmt.Errorf("--network-cidr %q: want NETWORK=CIDR", s)
		}
		nw, err := mesh.ParseNetworkID(n)
		if err != nil {
			return nil, fmt.Errorf("--network-cidr %q: %w", s, err)
		}
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return nil, fmt.Errorf("--network-cidr %q: %w", s, err)
		}
		out = append(out, primary.NetworkCIDR{Prefix: p.Masked(), Network: nw})
	}
	return out, nil
}

func parseGateways(in []string) ([]primary.Gateway, error) {
	var out []primary.Gateway
	for _, s := range in {
		n, a, ok := strings.Cut(s, "=")
		if !ok {
			return nil, fmt.Errorf("--gateway %q: want NETWORK=IP:PORT", s)
		}
		nw, err := mesh.ParseNetworkID(n)
		if err != nil {
			return nil, fmt.Errorf("--gateway %q: %w", s, err)
		}
		ap, err := netip.ParseAddrPort(a)
		if err != nil {
			return nil, fmt.Errorf("--gateway %q: %w", s, err)
		}
		out = append(out, primary.Gateway{Network: nw, Address: ap.Addr(), Port: ap.Port()})
	}
	return out, nil
}

// runPrimary serves xDS and HTTP and runs the primary until ctx ends, then shuts down:
// listeners first, then in-flight work.
// newCAServer builds the CSR API server: the plug-in CA from dir, a TLS serving
// certificate it issues for the control plane's names, and TokenReviews through the
// primary's cluster clients (so callers from linked remote clusters are authenticated in
// their own cluster).
func newCAServer(p *primary.Primary, cfg primary.Config, dir string, reg *prometheus.Registry, signer trust.Signer) (*caServer, error) {
	auth, err := trust.LoadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("--ca-dir: %w", err)
	}
	srv, err := trust.NewServer(trust.ServerConfig{Authority: auth, Signer: signer, Clusters: p, LocalCluster: cfg.ClusterID, Log: cfg.Log, Metrics: reg})
	if err != nil {
		return nil, err
	}
	names := []string{"istiod." + cfg.Namespace + ".svc", "istiod." + cfg.Namespace + ".svc." + cfg.Domain, "isthmus-primary." + cfg.Namespace + ".svc", "localhost"}
	certs, key, err := auth.IssueServing(names, 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	tc, err := tls.X509KeyPair(bytes.Join(certs, nil), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}))
	if err != nil {
		return nil, err
	}
	// Client certificates are requested, not required: renewals present one, first
	// requests authenticate with a token instead.
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{tc}, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12})))
	srv.Register(g)
	return &caServer{grpc: g, ca: srv, dir: dir}, nil
}

// certManagerSigner signs through cert-manager's issuer ref ("NAME" or "KIND/NAME");
// leaves must chain to the roots in dir's root-cert.pem.
func certManagerSigner(rc *rest.Config, ref, namespace, dir string) (*trust.CertManagerSigner, error) {
	issuer := cmmeta.IssuerReference{Name: ref, Kind: "Issuer", Group: "cert-manager.io"}
	if kind, name, ok := strings.Cut(ref, "/"); ok {
		if kind != "Issuer" && kind != "ClusterIssuer" {
			return nil, fmt.Errorf("--cert-manager-issuer %q: kind must be Issuer or ClusterIssuer", ref)
		}
		issuer.Kind, issuer.Name = kind, name
	}
	auth, err := trust.LoadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("--ca-dir: %w", err)
	}
	client, err := cmclient.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &trust.CertManagerSigner{Client: client, Namespace: namespace, Issuer: issuer, Anchors: auth.TrustAnchors()}, nil
}

// caServer is the primary's CA: its gRPC server, the CSR service, and the plug-in CA
// directory it reloads (a root rotation rewrites it).
type caServer struct {
	grpc *grpc.Server
	ca   *trust.Server
	dir  string
}

func runPrimary(ctx context.Context, p *primary.Primary, reg *prometheus.Registry, xdsAddr, httpAddr string, ca *caServer, caAddr string, log *slog.Logger) error {
	xl, err := net.Listen("tcp", xdsAddr)
	if err != nil {
		return fmt.Errorf("xDS listener: %w", err)
	}
	hl, err := net.Listen("tcp", httpAddr)
	if err != nil {
		xl.Close()
		return fmt.Errorf("HTTP listener: %w", err)
	}
	var cl net.Listener
	if ca != nil {
		if cl, err = net.Listen("tcp", caAddr); err != nil {
			xl.Close()
			hl.Close()
			return fmt.Errorf("CA listener: %w", err)
		}
		log.Info("CA serving", "address", cl.Addr().String())
	}
	log.Info("primary serving", "xds", xl.Addr().String(), "http", hl.Addr().String())
	g, ctx := errgroup.WithContext(ctx)
	mux := http.NewServeMux()
	mux.Handle("/", p.Handler(reg))
	if ca != nil {
		g.Go(func() error { return ca.grpc.Serve(cl) })
		// The plug-in CA is re-read when its files change, so `isthmus trust rotate` (or
		// an operator replacing the files) takes effect without a restart.
		g.Go(func() error {
			return trust.ReloadDir(ctx, ca.ca, ca.dir, 2*time.Second, func(err error) { log.Error("CA reload refused; still signing with the previous CA", "err", err) })
		})
		mux.Handle("/debug/trustz", ca.ca.DebugHandler())
	}
	gs := grpc.NewServer()
	p.RegisterXDS(ctx, gs)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	g.Go(func() error { return gs.Serve(xl) })
	g.Go(func() error {
		if err := hs.Serve(hl); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error { return p.Run(ctx) })
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
		servers := []*grpc.Server{gs}
		if ca != nil {
			servers = append(servers, ca.grpc)
		}
		for _, s := range servers {
			done := make(chan struct{})
			go func() { s.GracefulStop(); close(done) }()
			select {
			case <-done:
			case <-sctx.Done():
				s.Stop()
			}
		}
		return nil
	})
	err = g.Wait()
	if errors.Is(err, context.Canceled) || errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}
