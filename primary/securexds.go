package primary

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/proto"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// secureStreams is the state of the secure port's streams: the context each was opened
// with (its peer and credentials) until its first request is authenticated, then the
// node it authenticated as and the proxy it was bound to.
type secureStreams struct {
	p    *Primary
	auth Authenticator

	// viaGateway names, by local listener address, the network whose gateway's forward
	// is the only thing that dials that listener (SecureOptions.GatewayListeners).
	viaGateway map[string]mesh.NetworkID

	mu sync.Mutex
	// open and bound are guarded by mu, keyed by streamKey (SotW and delta streams are
	// numbered separately by go-control-plane).
	open  map[streamKey]context.Context
	bound map[streamKey]boundStream
}

type streamKey struct {
	delta bool
	id    int64
}

type boundStream struct {
	node  *core.Node
	proxy Proxy
}

// SecureOptions are optional settings of the secure port.
type SecureOptions struct {
	// GatewayListeners are the local addresses (as net.Addr.String) of listeners of the
	// same server that only a network gateway's forward dials, with that network: a
	// stream accepted on one took the path "via gateway <network>". A gateway's forward
	// dials from the gateway's own host, so its peer address does not tell.
	GatewayListeners map[string]mesh.NetworkID
}

// RegisterSecureXDS registers the aggregated discovery service (SotW and delta) on s, a
// gRPC server with TLS (the CA's: the same port serves the CSR API). Every stream is
// authenticated with a before its first response, and its node bound to what was proven
// (authenticateNode lists the rules); a refused stream ends with the refusal's gRPC code
// and is logged and counted in isthmus_primary_xds_auth_refused_total{reason}. The
// server stops its streams when ctx ends.
func (p *Primary) RegisterSecureXDS(ctx context.Context, s *grpc.Server, a Authenticator, o SecureOptions) error {
	if a == nil {
		return fmt.Errorf("primary: secure xDS needs an Authenticator")
	}
	ss := &secureStreams{p: p, auth: a, viaGateway: o.GatewayListeners, open: map[streamKey]context.Context{}, bound: map[streamKey]boundStream{}}
	p.mu.Lock()
	p.secure = ss
	p.mu.Unlock()
	srv := server.NewServer(ctx, p.cache, ss.callbacks())
	discovery.RegisterAggregatedDiscoveryServiceServer(s, srv)
	return nil
}

func (ss *secureStreams) callbacks() server.Callbacks {
	opened := func(delta bool) func(context.Context, int64, string) error {
		return func(ctx context.Context, id int64, _ string) error {
			ss.mu.Lock()
			ss.open[streamKey{delta, id}] = ctx
			ss.mu.Unlock()
			return nil
		}
	}
	closed := func(delta bool) func(int64, *core.Node) {
		return func(id int64, _ *core.Node) {
			k := streamKey{delta, id}
			ss.mu.Lock()
			delete(ss.open, k)
			_, was := ss.bound[k]
			delete(ss.bound, k)
			ss.mu.Unlock()
			if was {
				ss.p.metrics.proxies.Dec()
			}
		}
	}
	return server.CallbackFuncs{
		StreamOpenFunc:      opened(false),
		DeltaStreamOpenFunc: opened(true),
		StreamRequestFunc: func(id int64, r *discovery.DiscoveryRequest) error {
			return ss.request(streamKey{false, id}, r.GetNode(), r.GetTypeUrl(), r.GetErrorDetail() != nil)
		},
		StreamDeltaRequestFunc: func(id int64, r *discovery.DeltaDiscoveryRequest) error {
			return ss.request(streamKey{true, id}, r.GetNode(), r.GetTypeUrl(), r.GetErrorDetail() != nil)
		},
		StreamClosedFunc:      closed(false),
		DeltaStreamClosedFunc: closed(true),
	}
}

// request authenticates a stream's first request and checks that later ones name the
// same node. go-control-plane fills a SotW request's missing node from the first one;
// a delta request may carry none, which means the first.
func (ss *secureStreams) request(k streamKey, node *core.Node, typeURL string, nack bool) error {
	ss.mu.Lock()
	b, bound := ss.bound[k]
	ctx := ss.open[k]
	ss.mu.Unlock()
	if bound {
		if node != nil && !proto.Equal(node, b.node) {
			return ss.refused(b.node, refuse(refuseNodeChanged, codes.PermissionDenied, "stream authenticated as node %s now names node %q", b.proxy.ID, node.GetId()))
		}
		if nack {
			ss.p.metrics.nacks.WithLabelValues(typeURL).Inc()
		}
		return nil
	}
	if ctx == nil {
		ctx = context.Background() // not reached: go-control-plane opens before it requests
	}
	claim, err := DecodeNode(node)
	if err != nil {
		return ss.refused(node, refuse(refuseBadNode, codes.InvalidArgument, "%v", err))
	}
	proxy, ref := ss.p.authenticateNode(ctx, ss.auth, claim)
	if ref != nil {
		return ss.refused(node, ref)
	}
	if pn, err := ProxyFromNode(node); err == nil {
		proxy.Locality = pn.Locality               // a preference, not a permission: believed as claimed
		proxy.ConfigNamespace = pn.ConfigNamespace // = claim.Namespace (DecodeNode's sources agree)
	}
	proxy.Path = "direct"
	if pr, ok := peer.FromContext(ctx); ok && pr.Addr != nil {
		proxy.Peer = pr.Addr.String()
		proxy.Path = ss.p.pathOf(proxy.Peer)
		if pr.LocalAddr != nil {
			if nw, ok := ss.viaGateway[pr.LocalAddr.String()]; ok {
				proxy.Path = "via gateway " + string(nw)
			}
		}
	}
	ss.mu.Lock()
	if _, still := ss.open[k]; !still { // closed while we authenticated
		ss.mu.Unlock()
		return nil
	}
	ss.bound[k] = boundStream{node: proto.Clone(node).(*core.Node), proxy: proxy}
	ss.mu.Unlock()
	ss.p.metrics.proxies.Inc()
	ss.p.authMetrics.accepted.WithLabelValues(proxy.Auth).Inc()
	ss.p.log.Info("xDS stream authenticated", "node", proxy.ID, "identity", proxy.Identity, "method", proxy.Auth,
		"cluster", proxy.Cluster, "network", proxy.Network, "peer", proxy.Peer, "path", proxy.Path)
	if nack {
		ss.p.metrics.nacks.WithLabelValues(typeURL).Inc()
	}
	return nil
}

func (ss *secureStreams) refused(node *core.Node, r *refusal) error {
	ss.p.authMetrics.refused.WithLabelValues(r.reason).Inc()
	ss.p.log.Warn("xDS stream refused", "node", node.GetId(), "reason", r.reason, "err", r.err)
	return r
}

// proxies returns the secure port's authenticated proxies, by node ID.
func (ss *secureStreams) proxies() []Proxy {
	ss.mu.Lock()
	out := make([]Proxy, 0, len(ss.bound))
	for _, b := range ss.bound {
		out = append(out, b.proxy)
	}
	ss.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// SecureProxies returns the proxies connected to the secure port, with what each
// authenticated as; nil when the primary serves no secure port.
func (p *Primary) SecureProxies() []Proxy {
	p.mu.Lock()
	ss := p.secure
	p.mu.Unlock()
	if ss == nil {
		return nil
	}
	return ss.proxies()
}

// pathOf names the path of a stream from peer: through a network gateway when peer is
// the address of one the primary knows (discovered or configured), else direct.
func (p *Primary) pathOf(peer string) string {
	ap, err := netip.ParseAddrPort(peer)
	if err != nil {
		return "direct"
	}
	addr := ap.Addr().Unmap()
	gws := append([]Gateway(nil), p.cfg.Gateways...)
	p.mu.Lock()
	if p.lastView != nil {
		for _, list := range p.lastView.Gateways {
			gws = append(gws, list...)
		}
	}
	p.mu.Unlock()
	for _, g := range gws {
		if g.Address == addr {
			return "via gateway " + string(g.Network)
		}
	}
	return "direct"
}
