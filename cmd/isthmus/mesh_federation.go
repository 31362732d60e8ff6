package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

// SourceFederation is the registry source of services imported from peer meshes: one
// shard per peer mesh (ShardKey{SourceFederation, <peer mesh ID>}).
const SourceFederation = "federation"

// meshFederationFlags are the primary's mesh-federation flags (docs/federation.md).
type meshFederationFlags struct {
	meshID, addr, dir, gossip string
	follow                    string
	advertise, gateways       []string
	tokenTTL, staleWindow     time.Duration
	shareBundles              bool
}

func (f *meshFederationFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&f.addr, "federation-addr", "", "address of this mesh's federation endpoint (mTLS gRPC: peering, catalogs); mesh federation is off when empty")
	fs.StringVar(&f.follow, "federation-follow", "", "HOST:PORT of this mesh's federation endpoint (the --federation-addr of the primary that runs it): follow it, serving its imports and writing its peers' bundles here too, as another primary of the mesh (needs --ca-dir; not with --federation-addr)")
	fs.StringVar(&f.meshID, "mesh-id", "", "this mesh's ID (required with --federation-addr)")
	fs.StringVar(&f.dir, "federation-dir", "", "directory of the federation state (peerings, federation secret; 0700) and the admin socket admin.sock that `isthmus mesh peering` uses (required with --federation-addr)")
	fs.StringSliceVar(&f.advertise, "federation-advertise", nil, "HOST:PORT peers dial for this federation endpoint, put in tokens (default: --federation-addr)")
	fs.StringVar(&f.gossip, "federation-gossip-addr", "127.0.0.1:0", "IP:PORT of the memberlist gossip pool (UDP and TCP); keep the port fixed so peers find it again after a restart")
	fs.StringSliceVar(&f.gateways, "federation-gateway", nil, "IP:PORT of this mesh's east-west gateway that peers reach exported services through: its `isthmus gateway --federation-listen` address (repeatable; required to export)")
	fs.DurationVar(&f.tokenTTL, "federation-token-ttl", time.Hour, "how long a peering token can be used")
	fs.DurationVar(&f.staleWindow, "federation-stale-window", time.Minute, "how long a failing peer's imports are kept before they are withdrawn (negative: at once)")
	fs.BoolVar(&f.shareBundles, "federation-trust-peers", false, "write the peers' trust bundles into this mesh's bundle store, so workloads accept the peers' identities; off by default: the gateway refuses peers only services exported to nobody, so a server must authorize callers by trust domain (docs/federation.md)")
}

// meshFederation is what runs beside the primary when mesh federation is on.
type meshFederation struct {
	ep       *federation.Endpoint
	follower *federation.Follower // instead of ep, on the mesh's other primaries
	gw       *gatewaySet
	exports  *federation.KubeExports
	imports  *federation.KubeImports
	bundles  *federation.StoreBundles
	admin    net.Listener
	log      *slog.Logger
}

// build validates the flags and makes the endpoint; nil when --federation-addr is empty.
func (f *meshFederationFlags) build(ca *caServer, p *primary.Primary, td mesh.TrustDomain, namespace string, client kubernetes.Interface, rc *rest.Config, reg prometheus.Registerer, log *slog.Logger) (*meshFederation, error) {
	if f.addr == "" {
		if f.follow != "" {
			return f.buildFollower(ca, p, td, namespace, client, rc, reg, log)
		}
		return nil, nil
	}
	if f.follow != "" {
		return nil, errors.New("--federation-follow is for the mesh's other primaries: a primary runs the federation endpoint (--federation-addr) or follows one, not both")
	}
	if ca == nil {
		return nil, errors.New("--federation-addr needs --ca-dir: the federation endpoint's certificate and the bundle given to peers come from the mesh CA")
	}
	id, err := mesh.ParseMeshID(f.meshID)
	if err != nil {
		return nil, fmt.Errorf("--mesh-id: %w", err)
	}
	if f.dir == "" {
		return nil, errors.New("--federation-addr needs --federation-dir (peerings and the admin socket live there)")
	}
	host, port, err := net.SplitHostPort(f.gossip)
	if err != nil {
		return nil, fmt.Errorf("--federation-gossip-addr: %w", err)
	}
	gport, err := net.LookupPort("tcp", port)
	if err != nil {
		return nil, fmt.Errorf("--federation-gossip-addr: %w", err)
	}
	// The MCS CRDs: ServiceExports are read, ServiceImports written.
	cctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	err = federation.ApplyCRDs(cctx, rc)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("mesh federation needs the MCS CRDs (ServiceExport, ServiceImport): %w", err)
	}
	if err := os.MkdirAll(f.dir, 0o700); err != nil {
		return nil, fmt.Errorf("--federation-dir: %w", err)
	}
	mcs, err := mcsclient.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	// The mesh feed: the mesh's other primaries follow this endpoint (--federation-follow)
	// and get the same imports and export set, and the same bundles when peers are trusted.
	feed := federation.NewMeshFeed()
	gw := &gatewaySet{id: id, reg: p.Registry(), feed: feed, kick: make(chan struct{}, 1)}
	exports, err := federation.NewKubeExports(federation.KubeExportsConfig{Client: client, MCS: mcs, Namespace: namespace, TrustDomain: td, Log: log.With("component", "federation-exports"),
		OnChange: gw.setExports})
	if err != nil {
		return nil, err
	}
	imports := federation.NewKubeImports(mcs, log.With("component", "federation-imports"))
	l, err := net.Listen("tcp", f.addr)
	if err != nil {
		return nil, fmt.Errorf("federation listener: %w", err)
	}
	sockPath := filepath.Join(f.dir, "admin.sock")
	_ = os.Remove(sockPath) // a socket left by a previous run
	al, err := net.Listen("unix", sockPath)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("federation admin socket: %w", err)
	}
	if err := os.Chmod(sockPath, 0o600); err != nil {
		l.Close()
		al.Close()
		return nil, fmt.Errorf("federation admin socket: %w", err)
	}
	certs := &endpointCerts{ca: ca, namespace: namespace}
	bundles := federation.NewStoreBundles(trust.BundleStore{Client: client, Namespace: namespace}, log.With("component", "federation-bundles"))
	// The sink's calls also say that the set of live peerings changed (each brings its
	// bundle), which the gateways' export set follows.
	peerBundles := livePeers{kick: gw.kick}
	if f.shareBundles {
		peerBundles.next = bundleFanOut{bundles, feed}
	}
	ep, err := federation.NewEndpoint(federation.EndpointConfig{
		Mesh: id, TrustDomain: td, Certificate: certs.get,
		Roots:    func() []*x509.Certificate { return ca.ca.CurrentAuthority().TrustAnchors() },
		Listener: l, Advertise: f.advertise, GossipBindAddr: host, GossipPort: gport, Gateways: f.gateways,
		Exports: exports, Imports: fanOut{registryImports{reg: p.Registry()}, imports, feed}, PeerBundles: peerBundles, Feed: feed,
		Problems: func() []string {
			out := append(exports.Problems(), imports.Problems()...)
			if err := bundles.Err(); err != nil {
				out = append(out, err.Error())
			}
			return out
		},
		Store: federation.FileStore{Path: filepath.Join(f.dir, "state.json")}, StaleWindow: f.staleWindow, TokenTTL: f.tokenTTL,
		Log: log, Metrics: reg})
	if err != nil {
		l.Close()
		al.Close()
		return nil, err
	}
	log.Info("mesh federation endpoint serving", "mesh", id, "address", l.Addr().String(), "admin", sockPath)
	return &meshFederation{ep: ep, gw: gw, exports: exports, imports: imports, bundles: bundles, admin: al, log: log}, nil
}

// runBeside runs the federation and primary together until ctx ends or either fails.
func (m *meshFederation) runBeside(ctx context.Context, runPrimary func(context.Context) error) error {
	g, ctx := errgroup.WithContext(ctx)
	ctx, cancel := context.WithCancel(ctx)
	g.Go(func() error { defer cancel(); return runPrimary(ctx) })
	if m.follower != nil {
		g.Go(func() error { return m.follower.Run(ctx) })
		g.Go(func() error { return m.imports.Run(ctx) })
		g.Go(func() error { return m.bundles.Run(ctx) })
		return g.Wait()
	}
	g.Go(func() error { return m.ep.Run(ctx) })
	g.Go(func() error { return m.exports.Run(ctx) })
	g.Go(func() error { return m.imports.Run(ctx) })
	g.Go(func() error { return m.bundles.Run(ctx) })
	g.Go(func() error { return m.gw.run(ctx, m.ep) })
	g.Go(func() error { return serveHTTP(ctx, m.admin, federation.AdminHandler(m.ep)) })
	return g.Wait()
}

// endpointCerts keeps the federation endpoint's certificate, reissued from the current
// CA at half its life (and after a CA reload, which changes the authority).
type endpointCerts struct {
	ca        *caServer
	namespace string

	mu   sync.Mutex
	cert *tls.Certificate // guarded by mu
}

func (c *endpointCerts) get() (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cert != nil {
		leaf := c.cert.Leaf
		if time.Now().Before(leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) / 2)) {
			return c.cert, nil
		}
	}
	cert, err := federation.IssueEndpointCertificate(context.Background(), c.ca.ca.CurrentAuthority(), c.namespace, 24*time.Hour)
	if err != nil {
		return nil, err
	}
	c.cert = cert
	return cert, nil
}

// livePeers is the endpoint's PeerBundleSink: it hands the bundles on (when peers are
// trusted) and pokes kick, as the set of live peerings changed.
type livePeers struct {
	next federation.PeerBundleSink
	kick chan struct{}
}

func (l livePeers) SetPeerBundles(b map[mesh.TrustDomain]string) {
	if l.next != nil {
		l.next.SetPeerBundles(b)
	}
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// gatewaySet keeps the primary's gateway export set equal to the exports whose consumers
// include a live peering (not PENDING, not TERMINATED): deleting the peering of the only
// consumer closes the gateway to it at once.
type gatewaySet struct {
	id   mesh.MeshID
	reg  *primary.Registry
	feed federation.ExportSetSink // the followers' copy of the set
	kick chan struct{}

	mu sync.Mutex
	// exports and live are the inputs; guarded by mu. live is nil until the peerings
	// were first read.
	exports []federation.Export
	live    map[mesh.MeshID]mesh.TrustDomain
}

func (g *gatewaySet) setExports(e []federation.Export) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.exports = e
	g.applyLocked()
}

// run reads the live peerings whenever kicked, until ctx ends.
func (g *gatewaySet) run(ctx context.Context, ep *federation.Endpoint) error {
	for {
		live := map[mesh.MeshID]mesh.TrustDomain{}
		for _, p := range ep.Peerings() {
			if p.State != federation.StateTerminated && p.State != federation.StatePending {
				live[p.PeerMesh] = p.PeerTrustDomain
			}
		}
		g.mu.Lock()
		g.live = live
		g.applyLocked()
		g.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-g.kick:
		}
	}
}

func (g *gatewaySet) applyLocked() {
	if g.live == nil {
		return // the peerings are read at start; until then the gateways export nothing
	}
	ge := gatewayExports(g.id, g.exports, g.live)
	g.reg.SetFederationExports(ge)
	if g.feed != nil {
		g.feed.SetExportSet(exportSetOf(ge))
	}
}

// exportSetOf is the mesh feed's form of the primary's export set; registryExports the
// way back on a follower.
func exportSetOf(ge primary.FederationExports) federation.ExportSet {
	x := federation.ExportSet{Mesh: ge.Mesh, Services: []federation.ExportSetService{}, Peers: maps.Clone(ge.Peers)}
	for _, k := range slices.SortedFunc(maps.Keys(ge.Services), func(a, b mesh.ServiceKey) int { return strings.Compare(a.String(), b.String()) }) {
		x.Services = append(x.Services, federation.ExportSetService{Namespace: k.Namespace, Name: k.Name,
			Ports: slices.Clone(ge.Services[k]), Consumers: slices.Clone(ge.Consumers[k])})
	}
	return x
}

// registryExports writes a followed export set into the primary's registry, so this
// primary's gateways route the exports and its servers refuse peers as the endpoint's do.
type registryExports struct{ reg *primary.Registry }

func (r registryExports) SetExportSet(x federation.ExportSet) {
	ge := primary.FederationExports{Mesh: x.Mesh, Services: map[mesh.ServiceKey][]uint16{}, Consumers: map[mesh.ServiceKey][]mesh.MeshID{}, Peers: maps.Clone(x.Peers)}
	for _, s := range x.Services {
		k := mesh.ServiceKey{Namespace: s.Namespace, Name: s.Name}
		ge.Services[k], ge.Consumers[k] = slices.Clone(s.Ports), slices.Clone(s.Consumers)
	}
	r.reg.SetFederationExports(ge)
}

// gatewayExports is the primary's view of what this mesh exports: every exported port of
// a service exported to at least one live peer, whichever it is (the gateway cannot tell
// peers apart; see docs/federation.md), the live consumers of each, and every live peer's
// trust domain, whose callers servers refuse on every service not exported to that peer.
func gatewayExports(self mesh.MeshID, exports []federation.Export, live map[mesh.MeshID]mesh.TrustDomain) primary.FederationExports {
	out := primary.FederationExports{Mesh: self, Services: make(map[mesh.ServiceKey][]uint16, len(exports)),
		Consumers: map[mesh.ServiceKey][]mesh.MeshID{}, Peers: maps.Clone(live)}
	for _, e := range exports {
		var consumers []mesh.MeshID
		for _, m := range e.Consumers {
			if _, ok := live[m]; ok {
				consumers = append(consumers, m)
			}
		}
		if len(consumers) == 0 {
			continue
		}
		out.Consumers[e.Key] = consumers
		for _, p := range e.Ports {
			out.Services[e.Key] = append(out.Services[e.Key], p.Port)
		}
	}
	return out
}

// bundleFanOut hands peer bundles to several sinks.
type bundleFanOut []federation.PeerBundleSink

func (f bundleFanOut) SetPeerBundles(b map[mesh.TrustDomain]string) {
	for _, sink := range f {
		sink.SetPeerBundles(b)
	}
}

// fanOut hands imports to several sinks.
type fanOut []federation.ImportSink

func (f fanOut) ReplaceImports(peer mesh.MeshID, s []federation.ImportedService) {
	for _, sink := range f {
		sink.ReplaceImports(peer, s)
	}
}

// registryImports writes imports into the primary's registry: one shard per peer mesh,
// whose endpoints are the peer's east-west gateways on a network of their own
// ("federation-<peer>"), so that split horizon sends every local proxy to those gateways.
type registryImports struct{ reg *primary.Registry }

func (r registryImports) ReplaceImports(peer mesh.MeshID, svcs []federation.ImportedService) {
	key := primary.ShardKey{Source: SourceFederation, Cluster: mesh.ClusterID(peer)}
	if len(svcs) == 0 {
		r.reg.ReplaceShard(key, nil)
		return
	}
	network := mesh.NetworkID("federation-" + string(peer))
	data := &primary.ShardData{Services: map[mesh.Hostname]*primary.Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
	gws := map[netip.AddrPort]bool{}
	for _, s := range svcs {
		// The client requires the exporter's service accounts (or, when it lists none,
		// any identity of its trust domain) of the server behind the gateway.
		svc := &primary.Service{Hostname: s.Hostname, Key: s.Key, Identities: slices.Clone(s.Identities), TrustDomain: s.TrustDomain}
		var ports []mesh.Port
		for _, p := range s.Ports {
			svc.Ports = append(svc.Ports, primary.ServicePort{Name: p.Name, Port: p.Port, Protocol: p.Protocol})
			ports = append(ports, mesh.Port{Name: p.Name, Number: p.Port, Protocol: p.Protocol})
		}
		data.Services[s.Hostname] = svc
		for _, g := range s.Gateways {
			data.Endpoints[s.Hostname] = append(data.Endpoints[s.Hostname], mesh.Endpoint{Address: g.Addr(), Ports: ports,
				Cluster: mesh.ClusterID(peer), Network: network, Health: mesh.HealthHealthy, MTLSReady: true})
			gws[g] = true
		}
	}
	for g := range gws {
		data.Gateways = append(data.Gateways, primary.Gateway{Network: network, Address: g.Addr(), Port: g.Port(), Cluster: mesh.ClusterID(peer)})
	}
	slices.SortFunc(data.Gateways, func(a, b primary.Gateway) int {
		return cmp.Or(a.Address.Compare(b.Address), cmp.Compare(a.Port, b.Port))
	})
	r.reg.ReplaceShard(key, data)
}
