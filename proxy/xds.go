package proxy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	"crypto/tls"
	"crypto/x509"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// XDSConfig is what the ADS client needs.
type XDSConfig struct {
	Conn grpc.ClientConnInterface
	Node *core.Node
	// OnNACK is told each refused response (for logs and tests).
	OnNACK func(typeURL string, err error)
}

// state is what one stream has accepted, per type.
type state struct {
	listeners map[string]*Listener
	routes    map[string]*RouteTable
	clusters  map[string]*Cluster
	endpoints map[string][]netip.AddrPort
	secrets   map[string]*tls.Certificate
	clientCAs map[string]*x509.CertPool
	sent      map[string][]string // subscribed names per type (RDS, EDS, SDS)
	acked     map[string][2]string
}

// Run keeps an ADS stream to the primary and applies every accepted configuration to p,
// reconnecting with backoff, until ctx ends.
func (p *Proxy) Run(ctx context.Context, cfg XDSConfig) error {
	if cfg.Conn == nil || cfg.Node == nil {
		return errors.New("proxy: Run needs a connection and a node")
	}
	backoff := 500 * time.Millisecond
	for {
		start := time.Now()
		err := p.stream(ctx, cfg)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > time.Minute {
			backoff = 500 * time.Millisecond
		}
		p.opt.Log.Warn("xDS stream ended; keeping the last configuration and reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

func (p *Proxy) stream(ctx context.Context, cfg XDSConfig) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(cfg.Conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	s := &state{listeners: map[string]*Listener{}, routes: map[string]*RouteTable{}, clusters: map[string]*Cluster{},
		endpoints: map[string][]netip.AddrPort{}, secrets: map[string]*tls.Certificate{}, clientCAs: map[string]*x509.CertPool{}, sent: map[string][]string{}, acked: map[string][2]string{}}
	first := true
	nacked := map[string]string{} // the last refused version per type
	send := func(typeURL string, names []string, ack [2]string, nack error) error {
		req := &discovery.DiscoveryRequest{TypeUrl: typeURL, ResourceNames: names, VersionInfo: ack[0], ResponseNonce: ack[1]}
		if first {
			req.Node, first = cfg.Node, false
		}
		if nack != nil {
			req.ErrorDetail = &status.Status{Code: int32(codes.InvalidArgument), Message: nack.Error()}
		}
		return st.Send(req)
	}
	for _, t := range []string{resource.ListenerType, resource.ClusterType} {
		if err := send(t, nil, [2]string{}, nil); err != nil {
			return err
		}
	}
	for {
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		t := resp.GetTypeUrl()
		terr := s.accept(resp)
		if terr != nil {
			if cfg.OnNACK != nil {
				cfg.OnNACK(t, terr)
			}
			p.opt.Log.Warn("xDS: refusing a response", "type", t, "version", resp.GetVersionInfo(), "err", terr)
			if nacked[t] == resp.GetVersionInfo() {
				// The same refused version again: answer slowly, so a server that
				// re-sends it does not spin the stream.
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Second):
				}
			}
			nacked[t] = resp.GetVersionInfo()
			// A NACK keeps the last accepted version and names the nonce it answers.
			if err := send(t, s.sent[t], [2]string{s.acked[t][0], resp.GetNonce()}, terr); err != nil {
				return err
			}
			continue
		}
		s.acked[t] = [2]string{resp.GetVersionInfo(), resp.GetNonce()}
		if err := send(t, s.sent[t], s.acked[t], nil); err != nil {
			return err
		}
		// Subscriptions follow from what listeners and clusters name.
		for typ, names := range map[string][]string{resource.RouteType: s.routeNames(), resource.SecretType: s.secretNames(), resource.EndpointType: slices.Sorted(maps.Keys(s.clusters))} {
			if (typ == resource.RouteType || typ == resource.SecretType) && t != resource.ListenerType {
				continue
			}
			if typ == resource.EndpointType && t != resource.ClusterType {
				continue
			}
			if slices.Equal(names, s.sent[typ]) {
				continue
			}
			s.sent[typ] = names
			for k := range s.endpoints {
				if typ == resource.EndpointType && s.clusters[k] == nil {
					delete(s.endpoints, k)
				}
			}
			if err := send(typ, names, s.acked[typ], nil); err != nil {
				return err
			}
		}
		p.Apply(&Snapshot{Listeners: maps.Clone(s.listeners), Routes: maps.Clone(s.routes), Clusters: maps.Clone(s.clusters),
			Endpoints: maps.Clone(s.endpoints), Secrets: maps.Clone(s.secrets), ClientCAs: maps.Clone(s.clientCAs)})
	}
}

func (s *state) routeNames() []string {
	var out []string
	for _, l := range s.listeners {
		for _, c := range l.Chains {
			if c.Route != "" {
				out = append(out, c.Route)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (s *state) secretNames() []string {
	var out []string
	for _, l := range s.listeners {
		for _, c := range l.Chains {
			if c.Secret != "" {
				out = append(out, c.Secret)
			}
			if c.ClientCA != "" {
				out = append(out, c.ClientCA)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// accept translates a whole response; any refused resource refuses all of it and changes
// nothing. LDS and CDS are state of the world (absent resources are removed); RDS, EDS
// and SDS replace the named resources they carry.
func (s *state) accept(resp *discovery.DiscoveryResponse) error {
	switch t := resp.GetTypeUrl(); t {
	case resource.ListenerType:
		next := map[string]*Listener{}
		for _, a := range resp.GetResources() {
			var l listener.Listener
			if err := a.UnmarshalTo(&l); err != nil {
				return err
			}
			tl, err := TranslateListener(&l)
			if err != nil {
				return err
			}
			for _, o := range next {
				if o.Port == tl.Port {
					return fmt.Errorf("listener %s: port %d is also listener %s's", tl.Name, tl.Port, o.Name)
				}
			}
			next[tl.Name] = tl
		}
		s.listeners = next
	case resource.ClusterType:
		next := map[string]*Cluster{}
		for _, a := range resp.GetResources() {
			var c cluster.Cluster
			if err := a.UnmarshalTo(&c); err != nil {
				return err
			}
			tc, err := TranslateCluster(&c)
			if err != nil {
				return err
			}
			next[tc.Name] = tc
		}
		s.clusters = next
	case resource.RouteType:
		next := map[string]*RouteTable{}
		for _, a := range resp.GetResources() {
			var rc route.RouteConfiguration
			if err := a.UnmarshalTo(&rc); err != nil {
				return err
			}
			rt, err := TranslateRoutes(&rc)
			if err != nil {
				return err
			}
			next[rt.Name] = rt
		}
		s.routes = next
	case resource.EndpointType:
		next := map[string][]netip.AddrPort{}
		for _, a := range resp.GetResources() {
			var cla endpoint.ClusterLoadAssignment
			if err := a.UnmarshalTo(&cla); err != nil {
				return err
			}
			next[cla.GetClusterName()] = Endpoints(&cla)
		}
		s.endpoints = next
	case resource.SecretType:
		next, cas := map[string]*tls.Certificate{}, map[string]*x509.CertPool{}
		for _, a := range resp.GetResources() {
			var sec tlsv3.Secret
			if err := a.UnmarshalTo(&sec); err != nil {
				return err
			}
			if sec.GetValidationContext() != nil {
				pool, err := TranslateValidationContext(&sec)
				if err != nil {
					return err
				}
				cas[sec.GetName()] = pool
				continue
			}
			c, err := TranslateSecret(&sec)
			if err != nil {
				return err
			}
			next[sec.GetName()] = c
		}
		s.secrets, s.clientCAs = next, cas
	default:
		return fmt.Errorf("type %s is not implemented", t)
	}
	return nil
}
