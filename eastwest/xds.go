package eastwest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sort"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Type URLs the gateway subscribes to.
const (
	typeCluster  = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	typeEndpoint = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
)

// XDSConfig says how the gateway learns its routes from a primary.
type XDSConfig struct {
	// Conn is a gRPC connection to the primary's xDS server; required.
	Conn grpc.ClientConnInterface
	// NodeID identifies the gateway; default "router~0.0.0.0~eastwest~istio-system.svc.cluster.local".
	// The "router~" prefix makes the primary send the gateway view.
	NodeID string
	// Network is the gateway's network: it receives only that network's endpoints.
	Network mesh.NetworkID
	// Cluster is the cluster the gateway runs in.
	Cluster mesh.ClusterID
	// Log receives stream errors; nil discards.
	Log *slog.Logger
	// OnUpdate, if set, is called after every table update with the number of clusters.
	OnUpdate func(clusters int)
}

// WatchRoutes keeps table current from the primary over ADS until ctx ends: clusters
// (wildcard) and then their endpoints. When the stream breaks it reconnects with backoff
// and the table keeps its last routes meanwhile: the data plane keeps working through a
// control-plane outage.
//
// Backoff starts at 500 ms and doubles up to 30 s; a stream that lasted over a minute
// resets it, so one break after a long healthy stream reconnects quickly. It returns nil
// when ctx ends and an error only for a missing Conn or table.
func WatchRoutes(ctx context.Context, cfg XDSConfig, table *Table) error {
	if cfg.Conn == nil || table == nil {
		return errors.New("eastwest: WatchRoutes needs a connection and a table")
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "router~0.0.0.0~eastwest~istio-system.svc.cluster.local"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	backoff := 500 * time.Millisecond
	for {
		start := time.Now()
		err := watchOnce(ctx, cfg, table)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(start) > time.Minute {
			backoff = 500 * time.Millisecond // it was a working stream
		}
		cfg.Log.Warn("xDS stream ended; keeping the last routes and reconnecting", "err", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

// watchOnce runs one ADS stream: it subscribes to every cluster (wildcard CDS), then to
// the endpoints of exactly the clusters CDS named, ACKing each response. A cluster that
// leaves CDS leaves the table at once; endpoints are applied per response, so the table
// is never a mix of a half-decoded response. It returns when the stream breaks, or NACKs
// and returns on a response it cannot decode.
func watchOnce(ctx context.Context, cfg XDSConfig, table *Table) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(cfg.Conn).StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	meta, err := structpb.NewStruct(map[string]any{"NETWORK": string(cfg.Network), "CLUSTER_ID": string(cfg.Cluster)})
	if err != nil {
		return err
	}
	node := &core.Node{Id: cfg.NodeID, Metadata: meta}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: typeCluster}); err != nil {
		return err
	}
	var names []string // clusters subscribed for endpoints, sorted
	// The EDS version and nonce are kept so that a changed cluster list re-subscribes
	// with the last ACK, not as a fresh request the primary would answer in full.
	edsVersion, edsNonce := "", ""
	routes := map[string][]netip.AddrPort{} // this stream's routes; Table.Update copies them
	for {
		resp, err := stream.Recv()
		if err != nil {
			return err
		}
		switch resp.GetTypeUrl() {
		case typeCluster:
			next := make([]string, 0, len(resp.GetResources()))
			for _, r := range resp.GetResources() {
				name, err := clusterName(r.GetValue())
				if err != nil {
					return nackAndFail(stream, resp, err)
				}
				next = append(next, name)
			}
			sort.Strings(next)
			if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: typeCluster, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
				return err
			}
			if !equalStrings(names, next) {
				names = next
				for n := range routes {
					if i := sort.SearchStrings(names, n); i == len(names) || names[i] != n {
						delete(routes, n) // the cluster is gone
					}
				}
				table.Update(routes)
				if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: typeEndpoint, ResourceNames: names, VersionInfo: edsVersion, ResponseNonce: edsNonce}); err != nil {
					return err
				}
			}
		case typeEndpoint:
			for _, r := range resp.GetResources() {
				var cla endpoint.ClusterLoadAssignment
				if err := r.UnmarshalTo(&cla); err != nil {
					return nackAndFail(stream, resp, err)
				}
				routes[cla.GetClusterName()] = usableEndpoints(&cla)
			}
			table.Update(routes)
			edsVersion, edsNonce = resp.GetVersionInfo(), resp.GetNonce()
			if err := stream.Send(&discovery.DiscoveryRequest{TypeUrl: typeEndpoint, ResourceNames: names, VersionInfo: edsVersion, ResponseNonce: edsNonce}); err != nil {
				return err
			}
			if cfg.OnUpdate != nil {
				cfg.OnUpdate(table.Len())
			}
		}
	}
}

// usableEndpoints returns the socket addresses of healthy (or unknown-health) endpoints.
// Unknown counts as usable, as Envoy treats it: the primary sends UNKNOWN for endpoints
// whose source reports no health, and refusing them would black-hole those services.
// Addresses that do not parse are skipped, not fatal: one bad endpoint must not take the
// service's other endpoints down with it.
func usableEndpoints(cla *endpoint.ClusterLoadAssignment) []netip.AddrPort {
	var out []netip.AddrPort
	for _, loc := range cla.GetEndpoints() {
		for _, le := range loc.GetLbEndpoints() {
			switch le.GetHealthStatus() {
			case core.HealthStatus_UNHEALTHY, core.HealthStatus_DRAINING, core.HealthStatus_TIMEOUT:
				continue
			}
			sa := le.GetEndpoint().GetAddress().GetSocketAddress()
			ip, err := netip.ParseAddr(sa.GetAddress())
			if err != nil || sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
				continue
			}
			out = append(out, netip.AddrPortFrom(ip, uint16(sa.GetPortValue())))
		}
	}
	return out
}

// clusterName decodes a Cluster resource and returns its name: the gateway needs nothing
// else from CDS, it only learns which clusters to ask endpoints for.
func clusterName(b []byte) (string, error) {
	var c cluster.Cluster
	if err := proto.Unmarshal(b, &c); err != nil {
		return "", err
	}
	return c.GetName(), nil
}

// nackAndFail rejects resp (a NACK carrying err) and returns the error that ends the
// stream: a response the gateway cannot decode is not applied in part, and the reconnect
// asks again from scratch. The NACK is best effort; the stream is going away anyway.
func nackAndFail(stream discovery.AggregatedDiscoveryService_StreamAggregatedResourcesClient, resp *discovery.DiscoveryResponse, err error) error {
	stream.Send(&discovery.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce(), ErrorDetail: &status.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}})
	return fmt.Errorf("eastwest: rejected %s: %w", resp.GetTypeUrl(), err)
}

// equalStrings reports whether two sorted name lists are the same.
func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
