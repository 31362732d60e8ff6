package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// newGatewayCommand maps the flags to eastwest.Config and runs the gateway until
// interrupted. With --netns the data plane (--listen, --forward, dials to endpoints)
// lives in that namespace; xDS and HTTP stay in the host's.
func newGatewayCommand() *cobra.Command {
	var (
		xdsAddr, network, cluster, listen, peersAddr, httpAddr, logLevel, netns string
		forwards                                                                []string
		cfg                                                                     eastwest.Config
		dialFlags                                                               xdsDialFlags
	)
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run an east-west gateway: route TLS by SNI to this network's endpoints without terminating it",
		Long: `Run an east-west gateway.

It accepts TLS on --listen (15443), reads the server name of each ClientHello without
terminating the handshake, and forwards the connection to an endpoint of the service that
the name outbound_.<port>_.<subset>_.<hostname> designates, on this gateway's own network
(--network). Routes come from the primary over xDS (--xds-address). mTLS stays end to end.
--federation-listen serves peer meshes: there only this mesh's exported services are routed,
by the names peers give them (outbound_.<port>_._.<name>.<ns>.svc.<mesh ID>.isthmus).
--forward LISTEN=TARGET passes plain TCP through (for example the control plane's 15012 and
15017 to remote clusters). xDS goes to the primary's secure port with TLS and the token of
--service-account (from --kubeconfig's cluster), unless --plaintext-xds.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			nw, err := mesh.ParseNetworkID(network)
			if err != nil {
				return fmt.Errorf("--network: %w", err)
			}
			cid, err := mesh.ParseClusterID(cluster)
			if err != nil {
				return fmt.Errorf("--cluster-id: %w", err)
			}
			log, err := daemonLogger(cmd.ErrOrStderr(), logLevel)
			if err != nil {
				return err
			}
			reg := daemonRegistry()
			cfg.Routes, cfg.Log, cfg.Metrics = &eastwest.Table{}, log, reg
			listenFn := net.Listen
			if netns != "" {
				ns, err := netlab.Open(netns)
				if err != nil {
					return fmt.Errorf("--netns: %w", err)
				}
				defer ns.Close()
				cfg.Dial = func(ctx context.Context, a netip.AddrPort) (net.Conn, error) { return ns.Dial(ctx, a.String()) }
				listenFn = func(_, addr string) (net.Listener, error) { return ns.Listen(addr) }
			}
			gw, err := eastwest.New(cfg)
			if err != nil {
				return err
			}
			conn, err := dialFlags.dial(xdsAddr, cid)
			if err != nil {
				return fmt.Errorf("--xds-address: %w", err)
			}
			defer conn.Close()
			return runGateway(cmd.Context(), gw, cfg.Routes, eastwest.XDSConfig{Conn: conn, Network: nw, Cluster: cid, Log: log,
				NodeID: "router~0.0.0.0~eastwest-" + string(nw) + "~istio-system.svc.cluster.local"}, listenFn, listen, peersAddr, httpAddr, forwards, reg, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&xdsAddr, "xds-address", "localhost:15012", "the primary's xDS address (its secure port, beside the CA)")
	dialFlags.register(f, "istio-system/istio-eastwestgateway")
	f.StringVar(&network, "network", "", "the gateway's network (required)")
	f.StringVar(&cluster, "cluster-id", "", "the cluster the gateway runs in (required)")
	f.StringVar(&listen, "listen", ":15443", "address for cross-network mTLS traffic")
	f.StringVar(&peersAddr, "federation-listen", "", "address peer meshes reach (the primary's --federation-gateway): only exported services, under their federation names, are routed there; off when empty (docs/federation.md)")
	f.StringVar(&httpAddr, "http-address", ":15021", "address of /readyz and /metrics")
	f.StringSliceVar(&forwards, "forward", nil, "LISTEN=TARGET plain TCP passthrough, e.g. :15012=10.0.0.5:15012 (repeatable)")
	f.DurationVar(&cfg.IdleTimeout, "idle-timeout", time.Hour, "close connections idle this long")
	f.IntVar(&cfg.MaxConnections, "max-connections", 100000, "concurrent connection limit")
	f.StringVar(&netns, "netns", "", "network namespace (under /var/run/netns) to listen and dial in: the gateway's data plane lives there, its xDS and HTTP stay on the host")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.MarkFlagRequired("network")
	cmd.MarkFlagRequired("cluster-id")
	return cmd
}

// runGateway serves the gateway until ctx ends; listen opens its data-plane listeners
// (--listen, --federation-listen when peersAddr is set, and --forward), which may live in
// a network namespace. Every listener is open
// before anything serves. /readyz answers 503 until the first route table arrives from
// the primary, so a gateway is never sent traffic it cannot route. On shutdown the
// gateway drains (up to 30 s) while the HTTP server stops.
func runGateway(ctx context.Context, gw *eastwest.Gateway, table *eastwest.Table, xcfg eastwest.XDSConfig, listen func(network, addr string) (net.Listener, error), listenAddr, peersAddr, httpAddr string, forwards []string, reg *prometheus.Registry, log *slog.Logger) error {
	var ls openListeners
	l, err := ls.listen(listen, listenAddr, "--listen")
	if err != nil {
		return err
	}
	var pl net.Listener
	if peersAddr != "" {
		if pl, err = ls.listen(listen, peersAddr, "--federation-listen"); err != nil {
			return err
		}
	}
	// The HTTP server stays in the host's namespace (net.Listen, not listen): it is for the
	// operator and the scenario runner, not for the data plane.
	hl, err := ls.listen(net.Listen, httpAddr, "--http-address")
	if err != nil {
		return err
	}
	type forward struct {
		l  net.Listener
		to string
	}
	var fws []forward
	for _, fw := range forwards {
		from, to, ok := strings.Cut(fw, "=")
		if !ok {
			ls.close()
			return fmt.Errorf("--forward %q: want LISTEN=TARGET", fw)
		}
		fl, err := ls.listen(listen, from, fmt.Sprintf("--forward %q", fw))
		if err != nil {
			return err
		}
		fws = append(fws, forward{fl, to})
	}
	g, ctx := errgroup.WithContext(ctx)
	for _, fw := range fws {
		g.Go(func() error { return eastwest.Forward(ctx, fw.l, fw.to) })
	}
	synced := make(chan struct{})
	var once bool
	xcfg.OnUpdate = func(int) {
		if !once {
			once = true
			close(synced)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-synced:
			w.Write([]byte("ok\n"))
		default:
			http.Error(w, "no routes from the primary yet", http.StatusServiceUnavailable)
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	log.Info("gateway serving", "listen", l.Addr().String(), "http", hl.Addr().String())
	g.Go(func() error { return eastwest.WatchRoutes(ctx, xcfg, table) })
	g.Go(func() error { return gw.Serve(l) })
	if pl != nil {
		log.Info("gateway serving peer meshes", "federation_listen", pl.Addr().String())
		g.Go(func() error { return gw.ServePeers(pl) })
	}
	g.Go(func() error { return serveHTTP(ctx, hl, mux) })
	g.Go(func() error {
		<-ctx.Done()
		// Drain: stop accepting, let passthrough connections finish. Longer than the
		// HTTP grace, because a tunnelled connection carries a workload's live calls.
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return gw.Shutdown(sctx)
	})
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}
