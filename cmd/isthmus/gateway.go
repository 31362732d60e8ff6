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
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
)

func newGatewayCommand() *cobra.Command {
	var (
		xdsAddr, network, cluster, listen, httpAddr, logLevel, netns string
		forwards                                                     []string
		cfg                                                          eastwest.Config
	)
	cmd := &cobra.Command{
		Use:   "gateway",
		Short: "Run an east-west gateway: route TLS by SNI to this network's endpoints without terminating it",
		Long: `Run an east-west gateway.

It accepts TLS on --listen (15443), reads the server name of each ClientHello without
terminating the handshake, and forwards the connection to an endpoint of the service that
the name outbound_.<port>_.<subset>_.<hostname> designates, on this gateway's own network
(--network). Routes come from the primary over xDS (--xds-address). mTLS stays end to end.
--forward LISTEN=TARGET passes plain TCP through (for example the control plane's 15012 and
15017 to remote clusters).`,
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
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
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
			conn, err := grpc.NewClient(xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return fmt.Errorf("--xds-address: %w", err)
			}
			defer conn.Close()
			return runGateway(cmd.Context(), gw, cfg.Routes, eastwest.XDSConfig{Conn: conn, Network: nw, Cluster: cid, Log: log,
				NodeID: "router~0.0.0.0~eastwest-" + string(nw) + "~istio-system.svc.cluster.local"}, listenFn, listen, httpAddr, forwards, reg, log)
		},
	}
	f := cmd.Flags()
	f.StringVar(&xdsAddr, "xds-address", "localhost:15010", "the primary's xDS address")
	f.StringVar(&network, "network", "", "the gateway's network (required)")
	f.StringVar(&cluster, "cluster-id", "", "the cluster the gateway runs in (required)")
	f.StringVar(&listen, "listen", ":15443", "address for cross-network mTLS traffic")
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
// (--listen and --forward), which may live in a network namespace.
func runGateway(ctx context.Context, gw *eastwest.Gateway, table *eastwest.Table, xcfg eastwest.XDSConfig, listen func(network, addr string) (net.Listener, error), listenAddr, httpAddr string, forwards []string, reg *prometheus.Registry, log *slog.Logger) error {
	l, err := listen("tcp", listenAddr)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	g, ctx := errgroup.WithContext(ctx)
	for _, fw := range forwards {
		from, to, ok := strings.Cut(fw, "=")
		if !ok {
			l.Close()
			return fmt.Errorf("--forward %q: want LISTEN=TARGET", fw)
		}
		fl, err := listen("tcp", from)
		if err != nil {
			l.Close()
			return fmt.Errorf("--forward %q: %w", fw, err)
		}
		g.Go(func() error { return eastwest.Forward(ctx, fl, to) })
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
	hs := &http.Server{Addr: httpAddr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Info("gateway serving", "listen", l.Addr().String(), "http", httpAddr)
	g.Go(func() error { return eastwest.WatchRoutes(ctx, xcfg, table) })
	g.Go(func() error { return gw.Serve(l) })
	g.Go(func() error {
		if err := hs.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		hs.Shutdown(sctx)
		return gw.Shutdown(sctx) // drain: stop accepting, let connections finish
	})
	if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}
