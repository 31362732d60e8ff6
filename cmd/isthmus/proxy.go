package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/proxy"
	"github.com/isthmus-mesh/isthmus/trust"
)

// The proxy's modes; only ingress is built (docs/proxy.md).
const (
	proxyModeIngress = "ingress"
	proxyModeSidecar = "sidecar"
)

// newProxyCommand runs isthmus proxy: the data plane that consumes the Envoy xDS the
// primary serves to an ingress gateway. With --netns its listeners and upstream dials
// live in that namespace (the pod's network); xDS, the CA and HTTP stay in the host's.
func newProxyCommand() *cobra.Command {
	var (
		mode, xdsAddr, network, cluster, name, listenIP, netns, httpAddr, certDir, logLevel string
		labels                                                                              map[string]string
		certTTL                                                                             time.Duration
		dialFlags                                                                           xdsDialFlags
	)
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run a data plane that consumes the primary's Envoy xDS: an ingress gateway (--mode ingress)",
		Long: `Run isthmus proxy, a data plane for the Envoy-shaped xDS the primary serves.

--mode ingress is an ingress gateway, as Istio's istio-ingressgateway (an Envoy) is: it
identifies itself to the primary as a router with the pod labels of --label (default
istio=ingressgateway), so the Gateways whose selector matches them configure it. It
serves their listeners (HTTP, HTTPS with the certificates of their credentialName Secrets
over SDS, TLS passthrough by SNI, TCP) and routes by the VirtualServices bound to them to
the mesh's services, with mTLS from its own mesh certificate (requested from the
primary's CA with the token of --service-account) and the cross-network SNI, so services
on other networks are reached through their east-west gateways.

xDS and the CA are the primary's secure port (--xds-address); a response the proxy
cannot carry out is refused (NACK) with the field at fault, and the previous
configuration stays in force. /readyz answers once every configured listener is open,
/debug/config lists what is in force, /metrics counts requests and refusals.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch mode {
			case proxyModeIngress:
			case proxyModeSidecar:
				return errors.New("--mode sidecar is not built yet (docs/proxy.md); run --mode ingress")
			default:
				return fmt.Errorf("--mode %q: want %s", mode, proxyModeIngress)
			}
			nw, err := mesh.ParseNetworkID(network)
			if err != nil {
				return fmt.Errorf("--network: %w", err)
			}
			cid, err := mesh.ParseClusterID(cluster)
			if err != nil {
				return fmt.Errorf("--cluster-id: %w", err)
			}
			ip := "0.0.0.0"
			if listenIP != "" {
				if net.ParseIP(listenIP) == nil {
					return fmt.Errorf("--listen-address %q: not an IP address", listenIP)
				}
				ip = listenIP
			}
			if len(labels) == 0 {
				return errors.New("--label: an ingress needs at least one pod label for Gateway selectors (e.g. istio=ingressgateway)")
			}
			ns, _, _ := strings.Cut(dialFlags.serviceAccount, "/")
			node, err := ingressNode(ip, name, ns, nw, cid, labels)
			if err != nil {
				return err
			}
			log, err := daemonLogger(cmd.ErrOrStderr(), logLevel)
			if err != nil {
				return err
			}
			reg := daemonRegistry()
			opt := proxy.Options{Log: log, Metrics: reg}
			listen := net.Listen
			if netns != "" {
				h, err := netlab.Open(netns)
				if err != nil {
					return fmt.Errorf("--netns: %w", err)
				}
				defer h.Close()
				listen = func(_, addr string) (net.Listener, error) { return h.Listen(addr) }
				opt.Dial = func(ctx context.Context, addr string) (net.Conn, error) { return h.Dial(ctx, addr) }
			}
			opt.Listen = func(port uint16) (net.Listener, error) {
				return listen("tcp", net.JoinHostPort(ip, strconv.Itoa(int(port))))
			}
			hl, err := net.Listen("tcp", httpAddr)
			if err != nil {
				return fmt.Errorf("--http-address: %w", err)
			}
			defer hl.Close()
			conn, sec, err := dialFlags.dialSecure(xdsAddr, cid)
			if err != nil {
				return fmt.Errorf("--xds-address: %w", err)
			}
			defer conn.Close()
			g, ctx := errgroup.WithContext(cmd.Context())
			if sec.tls != nil {
				// The mesh certificate: the CSR API on the same secure port, a second
				// connection whose calls carry the agent's own token metadata.
				if certDir == "" {
					if certDir, err = os.MkdirTemp("", "isthmus-proxy-"); err != nil {
						return err
					}
					defer os.RemoveAll(certDir)
				}
				caConn, err := grpc.NewClient("passthrough:///"+xdsAddr, grpc.WithTransportCredentials(credentials.NewTLS(sec.tls)))
				if err != nil {
					return fmt.Errorf("--xds-address: %w", err)
				}
				defer caConn.Close()
				mt := newMeshTLS(certDir)
				agent, err := trust.NewAgent(trust.AgentConfig{CA: pb.NewIstioCertificateServiceClient(caConn), Token: sec.token.Token,
					Cluster: cid, Dir: certDir, TTL: certTTL, Log: log, OnIssue: mt.onIssue(log)})
				if err != nil {
					return err
				}
				mt.agent = agent
				opt.MeshTLS = mt.config
				g.Go(func() error { return agent.Run(ctx) })
				g.Go(func() error {
					return trust.WatchBundleStore(ctx, sec.token.client, ns, mt.peers, func() {
						if err := mt.writer.Update(); err != nil {
							log.Warn("trust bundles not updated", "err", err)
						}
					}, func(err error) { log.Warn("bundle store refused; the bundles in force stay", "err", err) })
				})
			} else {
				log.Warn("plaintext xDS: no mesh certificate, so routes to mTLS services answer 503")
			}
			p, err := proxy.New(opt)
			if err != nil {
				return err
			}
			defer p.Close()
			mux := http.NewServeMux()
			mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
				if !p.Status().Ready() {
					http.Error(w, "no listener from the primary yet, or one not open", http.StatusServiceUnavailable)
					return
				}
				w.Write([]byte("ok\n"))
			})
			mux.HandleFunc("/debug/config", func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				enc := json.NewEncoder(w)
				enc.SetIndent("", "  ")
				enc.Encode(p.Status())
			})
			mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
			log.Info("proxy starting", "mode", mode, "node", node.GetId(), "xds", xdsAddr, "http", hl.Addr().String())
			g.Go(func() error {
				return p.Run(ctx, proxy.XDSConfig{Conn: conn, Node: node})
			})
			g.Go(func() error { return serveHTTP(ctx, hl, mux) })
			if err := g.Wait(); err != nil && !errors.Is(err, context.Canceled) {
				return err
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&mode, "mode", proxyModeIngress, "what the proxy is: ingress (sidecar is not built yet)")
	f.StringVar(&xdsAddr, "xds-address", "localhost:15012", "the primary's xDS address (its secure port, beside the CA)")
	dialFlags.register(f, "istio-system/istio-ingressgateway-service-account")
	f.StringVar(&network, "network", "", "the network the proxy runs on (required)")
	f.StringVar(&cluster, "cluster-id", "", "the cluster the proxy runs in (required)")
	f.StringVar(&name, "name", "istio-ingressgateway", "the proxy's pod name, in its xDS node ID")
	f.StringToStringVar(&labels, "label", map[string]string{"istio": "ingressgateway"}, "the proxy's pod labels KEY=VALUE, which Gateway selectors match (repeatable)")
	f.StringVar(&listenIP, "listen-address", "", "the IP the Gateway's ports are opened on (default all addresses)")
	f.StringVar(&netns, "netns", "", "network namespace (under /var/run/netns) of the listeners and upstream connections; xDS and HTTP stay on the host")
	f.StringVar(&httpAddr, "http-address", ":15021", "address of /readyz, /debug/config and /metrics")
	f.StringVar(&certDir, "cert-dir", "", "directory for the mesh certificate files (default a temporary directory)")
	f.DurationVar(&certTTL, "cert-ttl", 24*time.Hour, "validity of the mesh certificate to ask for (renewed at half)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.MarkFlagRequired("network")
	cmd.MarkFlagRequired("cluster-id")
	return cmd
}

// ingressNode is the xDS node of an ingress, in Istio's convention: a router whose
// metadata carries its pod labels (which Gateway selectors match), network and cluster.
func ingressNode(ip, name, namespace string, nw mesh.NetworkID, cid mesh.ClusterID, labels map[string]string) (*core.Node, error) {
	if name == "" || namespace == "" {
		return nil, errors.New("--name and the --service-account namespace must not be empty")
	}
	l := map[string]any{}
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		l[k] = labels[k]
	}
	meta, err := structpb.NewStruct(map[string]any{"NETWORK": string(nw), "CLUSTER_ID": string(cid), "NAMESPACE": namespace, "LABELS": l})
	if err != nil {
		return nil, fmt.Errorf("--label: %w", err)
	}
	return &core.Node{Id: fmt.Sprintf("router~%s~%s.%s~%s.svc.cluster.local", ip, name, namespace, namespace), Metadata: meta}, nil
}

// meshTLS is the proxy's client side of mTLS to mesh endpoints: its certificate from the
// agent, and the peer verified against the bundle of the peer's own trust domain (the
// CA's roots, and peer domains' bundles from the bundle store).
type meshTLS struct {
	agent  *trust.Agent
	peers  *trust.BundleSet
	writer *trust.BundleMapWriter
}

func newMeshTLS(dir string) *meshTLS { // dir holds the agent's files and the bundle map
	peers := trust.NewBundleSet()
	return &meshTLS{peers: peers, writer: &trust.BundleMapWriter{Path: trust.BundleMapPath(dir), Peers: peers}}
}

// onIssue takes the roots of each new certificate as the local domain's bundle.
func (m *meshTLS) onIssue(log *slog.Logger) func(trust.Issued) {
	return func(in trust.Issued) {
		id, err := m.writer.SetIssued(in)
		if err != nil {
			log.Warn("trust bundles not written", "err", err)
			return
		}
		log.Info("mesh certificate issued", "identity", id.String(), "expires", in.Leaf.NotAfter)
	}
}

// config is proxy.Options.MeshTLS: SNI as the cluster names it, the current certificate
// at each handshake, and the server's SPIFFE identity verified against its own trust
// domain's bundle (a mesh certificate names no DNS host, so the chain is checked here
// rather than by host name).
func (m *meshTLS) config(sni string) (*tls.Config, error) {
	if _, err := m.agent.KeyPair(); err != nil {
		return nil, err
	}
	return &tls.Config{
		ServerName: sni, MinVersion: tls.VersionTLS12,
		InsecureSkipVerify: true, // verified by VerifyPeerCertificate against the SPIFFE bundles
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			set := m.writer.Bundles()
			if set == nil {
				return errors.New("no trust bundles yet")
			}
			_, err := set.VerifyPeer(raw)
			return err
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return m.agent.KeyPair() },
	}, nil
}
