package main

import (
	"context"
	"crypto/tls"
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
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

// newPrimaryCommand maps the flags to primary.Config (and, with --ca-dir, to the CA
// server) and runs them all until interrupted. Everything is validated before any
// listener opens: a bad flag or CA directory fails the start, it never half-starts.
func newPrimaryCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, clusterID, network, trustDomain, logLevel string
		xdsAddr, httpAddr, caDir, caAddr, cmIssuer, cmNamespace, plainXDS  string
		cidrs, gateways, gatewayListeners                                  []string
		cfg                                                                primary.Config
		fedFlags                                                           federationFlags
		meshFlags                                                          meshFederationFlags
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
  --ca-address     TLS: the CSR API and the secure xDS (ADS) port, as Istio's 15012;
                   every stream authenticates with a mesh client certificate or a
                   service-account token (needs --ca-dir)
  --plaintext-xds-address
                   plaintext xDS that believes every node: off unless given (tests,
                   local debugging)
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
			if cfg.Log, err = daemonLogger(cmd.ErrOrStderr(), logLevel); err != nil {
				return err
			}
			rc, err := kubeConfig(kubeconfig, kubeContext)
			if err != nil {
				return fmt.Errorf("the local cluster: %w", err)
			}
			if cfg.LocalClient, err = kubernetes.NewForConfig(rc); err != nil {
				return err
			}
			// VirtualServices and DestinationRules are read once Istio's CRDs exist.
			if cfg.IstioClient, err = istioclient.NewForConfig(rc); err != nil {
				return err
			}
			reg := daemonRegistry()
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
				for _, gl := range gatewayListeners {
					nw, addr, ok := strings.Cut(gl, "=")
					if _, err := mesh.ParseNetworkID(nw); !ok || err != nil || addr == "" {
						return fmt.Errorf("--gateway-listener %q: want NETWORK=ADDRESS", gl)
					}
				}
				ca.gatewayListeners = gatewayListeners
			} else if cmIssuer != "" {
				return errors.New("--cert-manager-issuer needs --ca-dir (its root-cert.pem names the roots cert-manager's leaves must chain to)")
			}
			if xdsAddr == "" {
				xdsAddr = plainXDS
			}
			if ca == nil && len(gatewayListeners) > 0 {
				return errors.New("--gateway-listener needs --ca-dir (it is another address of the CA's secure port)")
			}
			if ca == nil && xdsAddr == "" {
				return errors.New("no xDS port: give --ca-dir (secure xDS beside the CA on --ca-address), or --plaintext-xds-address for an unauthenticated one")
			}
			fed, err := fedFlags.build(cmd.Context(), ca, cfg.LocalClient, cfg.TrustDomain, cfg.Namespace, reg, cfg.Log)
			if err != nil {
				return err
			}
			mf, err := meshFlags.build(ca, p, cfg.TrustDomain, cfg.Namespace, cfg.LocalClient, rc, reg, cfg.Log)
			if err != nil {
				return err
			}
			run := func(ctx context.Context) error {
				return runPrimary(ctx, p, reg, xdsAddr, httpAddr, ca, caAddr, cfg.Log, fed)
			}
			if mf != nil {
				return mf.runBeside(cmd.Context(), run) // mesh federation: docs/federation.md
			}
			return run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster the primary runs in (default: $KUBECONFIG or ~/.kube/config)")
	f.StringVar(&kubeContext, "context", "", "context in the kubeconfig to use")
	f.StringVar(&clusterID, "cluster-id", "", "ID of the cluster the primary runs in (required)")
	f.StringVar(&cfg.Namespace, "namespace", "istio-system", "namespace of the remote secrets (and the system namespace whose network label names a cluster's network)")
	f.StringVar(&cfg.KubeconfigDir, "kubeconfig-dir", "", "directory of kubeconfig files, one per remote cluster named <cluster-id>.<ext>")
	f.StringVar(&plainXDS, "plaintext-xds-address", "", "address of a plaintext, unauthenticated xDS server (off when empty; the secure one is on --ca-address)")
	f.StringVar(&xdsAddr, "xds-address", "", "")
	f.MarkDeprecated("xds-address", "use --plaintext-xds-address (plaintext xDS) or --ca-address (secure xDS)")
	f.StringVar(&httpAddr, "http-address", ":15014", "address of the readiness, metrics and debug server")
	f.DurationVar(&cfg.SyncTimeout, "sync-timeout", 10*time.Second, "longest a cluster's first sync holds readiness back")
	f.DurationVar(&cfg.StaleWindow, "stale-window", 60*time.Second, "how long an unreachable cluster's endpoints are kept before they are withdrawn")
	f.DurationVar(&cfg.ProbeInterval, "probe-interval", 5*time.Second, "how often each cluster's API server is probed")
	f.DurationVar(&cfg.Debounce, "debounce", 100*time.Millisecond, "window that coalesces a burst of changes into one push (a lone change is pushed at once)")
	f.StringVar(&cfg.Domain, "domain", "cluster.local", "cluster DNS domain")
	f.StringVar(&trustDomain, "trust-domain", "cluster.local", "trust domain of workload identities")
	f.StringVar(&network, "network", "", "network of clusters whose system namespace has no topology.istio.io/network label")
	f.StringSliceVar(&cidrs, "network-cidr", nil, "NETWORK=CIDR: endpoints in CIDR are on NETWORK unless labelled (repeatable)")
	f.StringSliceVar(&gateways, "gateway", nil, "NETWORK=IP:PORT: a gateway of NETWORK besides discovered ones (repeatable)")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowExec, "allow-exec-kubeconfigs", false, "accept remote kubeconfigs with exec credential plugins (runs commands on this host)")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowAuthProvider, "allow-auth-provider-kubeconfigs", false, "accept remote kubeconfigs with auth-provider plugins")
	f.BoolVar(&cfg.KubeconfigPolicy.AllowFiles, "allow-file-kubeconfigs", false, "accept remote kubeconfigs that reference files on this host")
	f.StringVar(&caDir, "ca-dir", "", "plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem); serves Istio's CSR API when set")
	f.StringSliceVar(&gatewayListeners, "gateway-listener", nil, "NETWORK=ADDRESS: the CA and secure xDS also on ADDRESS, for NETWORK's gateway to --forward to, so status shows such streams as via that gateway (repeatable)")
	f.StringVar(&caAddr, "ca-address", ":15012", "address of the CA (CSR API) gRPC server, TLS")
	f.StringVar(&cmIssuer, "cert-manager-issuer", "", "sign through cert-manager: NAME or KIND/NAME of an Issuer or ClusterIssuer (workload CSRs must name their SPIFFE ID)")
	f.StringVar(&cmNamespace, "cert-manager-namespace", "istio-system", "namespace of the CertificateRequests (and of an Issuer)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	fedFlags.register(f)
	meshFlags.register(f)
	cmd.MarkFlagRequired("cluster-id")
	return cmd
}

// parseNetworkCIDRs parses --network-cidr NETWORK=CIDR values; the prefix is masked, so
// 10.1.2.3/16 means 10.1.0.0/16.
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

// parseGateways parses --gateway NETWORK=IP:PORT values (IPv6 as [addr]:port).
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
	// The serving certificate is issued once at start and lives a year: a root rotation
	// that retires its root needs a restart of the primary to take a new one.
	tc, err := auth.ServingCertificate(trust.ServingNames(cfg.Namespace, cfg.Domain), 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	// Client certificates are requested, not required: xDS clients and renewals present
	// one, first requests authenticate with a token instead. One that is presented must
	// verify at the handshake (expired: refused, so the client reconnects with its renewed
	// one rather than being refused on every stream of a connection that stays up).
	// A connection is told to go away (GOAWAY) after caConnectionAge: its open streams
	// carry on, new ones open on a new connection, with a new handshake. So no client is
	// held for long on a connection whose certificate's root has been retired since, whose
	// streams Authenticate refuses.
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{tc}, ClientAuth: tls.RequestClientCert,
		VerifyPeerCertificate: srv.VerifyClientCertificate, MinVersion: tls.VersionTLS12})),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionAge: caConnectionAge}))
	srv.Register(g)
	return &caServer{grpc: g, ca: srv, dir: dir}, nil
}

// caConnectionAge is how long a connection to the CA and secure xDS port is used for new
// streams (Istio's istiod uses 30 minutes too).
const caConnectionAge = 30 * time.Minute

// certManagerSigner signs through cert-manager's issuer ref ("NAME" or "KIND/NAME", KIND
// Issuer or ClusterIssuer, group cert-manager.io); leaves must chain to the roots in
// dir's root-cert.pem. The anchors are read once at start: a rotation of the roots
// cert-manager signs under needs a restart.
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
	// gatewayListeners are --gateway-listener NETWORK=ADDR, validated.
	gatewayListeners []string
	grpc             *grpc.Server
	ca               *trust.Server
	dir              string
}

// runPrimary serves xDS, HTTP and (when ca is set) the CA, and runs the primary until ctx
// ends, then shuts down: listeners first, then in-flight work, each server given
// shutdownGrace before it is cut off. A listener that cannot be opened fails the call
// before anything starts.
func runPrimary(ctx context.Context, p *primary.Primary, reg *prometheus.Registry, xdsAddr, httpAddr string, ca *caServer, caAddr string, log *slog.Logger, fed *federationRunner) error {
	// xdsAddr is the plaintext port, empty when not enabled explicitly.
	var ls openListeners
	var xl net.Listener
	var err error
	if xdsAddr != "" {
		if xl, err = ls.listen(net.Listen, xdsAddr, "plaintext xDS listener"); err != nil {
			return err
		}
		log.Warn("plaintext xDS serving: it believes every node's metadata; use it for tests and local debugging only", "address", xl.Addr().String())
	}
	hl, err := ls.listen(net.Listen, httpAddr, "HTTP listener")
	if err != nil {
		return err
	}
	var cl net.Listener
	if ca != nil {
		if cl, err = ls.listen(net.Listen, caAddr, "CA listener"); err != nil {
			return err
		}
		log.Info("CA and secure xDS serving", "address", cl.Addr().String())
	}
	// Gateway listeners: the same server on ports only a network gateway's forward dials,
	// so a stream's path is known (--gateway-listener).
	viaGateway := map[string]mesh.NetworkID{}
	var gls []net.Listener
	if ca != nil {
		for _, gl := range ca.gatewayListeners {
			nw, addr, _ := strings.Cut(gl, "=")
			l, err := ls.listen(net.Listen, addr, "--gateway-listener "+gl)
			if err != nil {
				return err
			}
			viaGateway[l.Addr().String()] = mesh.NetworkID(nw)
			gls = append(gls, l)
			log.Info("CA and secure xDS serving for the gateway of "+nw, "address", l.Addr().String())
		}
	}
	log.Info("primary serving", "http", hl.Addr().String())
	g, ctx := errgroup.WithContext(ctx)
	mux := http.NewServeMux()
	mux.Handle("/", p.Handler(reg))
	if ca != nil {
		if err := p.RegisterSecureXDS(ctx, ca.grpc, ca.ca, primary.SecureOptions{GatewayListeners: viaGateway}); err != nil {
			ls.close()
			return err
		}
		g.Go(func() error { return ca.grpc.Serve(cl) })
		for _, l := range gls {
			g.Go(func() error { return ca.grpc.Serve(l) })
		}
		// The plug-in CA is re-read when its files change, so `isthmus trust rotate` (or
		// an operator replacing the files) takes effect without a restart.
		g.Go(func() error {
			return trust.ReloadDir(ctx, ca.ca, ca.dir, 2*time.Second, func(err error) { log.Error("CA reload refused; still signing with the previous CA", "err", err) })
		})
		if fed != nil {
			fed.start(ctx, g, ca, mux) // trustz with the federation's status, the bundle endpoint
		} else {
			mux.Handle("/debug/trustz", ca.ca.DebugHandler())
		}
	}
	gs := grpc.NewServer()
	p.RegisterXDS(ctx, gs)
	if xl != nil {
		g.Go(func() error { return gs.Serve(xl) })
	}
	g.Go(func() error { return serveHTTP(ctx, hl, mux) })
	g.Go(func() error { return p.Run(ctx) })
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		defer cancel()
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
