package primary

import (
	"fmt"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// ProxyKind is what kind of xDS client a proxy is; it decides which resources it gets.
type ProxyKind string

// Proxy kinds.
const (
	// ProxyGRPC is a proxyless gRPC client: api_listener Listeners named host:port.
	ProxyGRPC ProxyKind = "grpc"
	// ProxySidecar is an Envoy sidecar: outbound listeners per port, routes by host.
	ProxySidecar ProxyKind = "sidecar"
	// ProxyGateway is an east-west gateway: clusters and endpoints of its own network only.
	ProxyGateway ProxyKind = "gateway"
)

// Node metadata keys, in Istio's spelling so that Istio's agents describe themselves the
// same way.
const (
	MetaClusterID = "CLUSTER_ID"
	MetaNetwork   = "NETWORK"
	MetaGenerator = "GENERATOR" // "grpc" for proxyless gRPC clients
)

// Proxy is a connected xDS client as the primary understands it.
type Proxy struct {
	ID      string
	Kind    ProxyKind
	Cluster mesh.ClusterID
	Network mesh.NetworkID
}

// ViewKey is what makes two proxies' configuration differ. Every proxy with the same key
// gets the very same snapshot, built and marshalled once.
type ViewKey struct {
	Kind    ProxyKind
	Network mesh.NetworkID
}

// String returns "kind/network".
func (k ViewKey) String() string { return string(k.Kind) + "/" + string(k.Network) }

// Key returns the proxy's view key.
func (p Proxy) Key() ViewKey { return ViewKey{Kind: p.Kind, Network: p.Network} }

// ProxyFromNode reads a proxy's identity from its xDS Node: Istio's node ID convention
// ("router~..." for gateways, "sidecar~..." otherwise), GENERATOR=grpc for proxyless
// clients, and the CLUSTER_ID and NETWORK metadata. Malformed metadata is an error, which
// the server turns into a refused stream rather than a guess.
func ProxyFromNode(n *core.Node) (Proxy, error) {
	if n == nil || n.GetId() == "" {
		return Proxy{}, fmt.Errorf("xDS node has no ID")
	}
	p := Proxy{ID: n.GetId(), Kind: ProxySidecar}
	if strings.HasPrefix(n.GetId(), "router~") {
		p.Kind = ProxyGateway
	}
	fields := n.GetMetadata().GetFields()
	if fields[MetaGenerator].GetStringValue() == "grpc" {
		p.Kind = ProxyGRPC
	}
	if v := fields[MetaClusterID].GetStringValue(); v != "" {
		id, err := mesh.ParseClusterID(v)
		if err != nil {
			return Proxy{}, fmt.Errorf("node %s: metadata %s: %w", n.GetId(), MetaClusterID, err)
		}
		p.Cluster = id
	}
	if v := fields[MetaNetwork].GetStringValue(); v != "" {
		nw, err := mesh.ParseNetworkID(v)
		if err != nil {
			return Proxy{}, fmt.Errorf("node %s: metadata %s: %w", n.GetId(), MetaNetwork, err)
		}
		p.Network = nw
	}
	return p, nil
}
