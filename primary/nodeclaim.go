package primary

import (
	"fmt"
	"net/netip"
	"strings"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// More node metadata keys in Istio's spelling. They are claims: on the secure port each
// is checked against what the caller proved (see bind in auth.go).
const (
	MetaNamespace      = "NAMESPACE"
	MetaServiceAccount = "SERVICE_ACCOUNT"
)

// NodeClaim is what an xDS node says about itself, decoded but not yet believed.
type NodeClaim struct {
	// ID is the node ID, Istio's "<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>".
	ID string
	// Kind follows from the type ("router" is a gateway) and GENERATOR=grpc.
	Kind ProxyKind
	// IP is the node ID's address (0.0.0.0 for a gateway that does not say).
	IP netip.Addr
	// Pod is the node ID's pod name, without the namespace.
	Pod string
	// Namespace is the namespace every place of the node names (metadata NAMESPACE, the
	// ID's "<pod>.<namespace>", the domain's first label); they must agree.
	Namespace string
	// ServiceAccount is metadata SERVICE_ACCOUNT, empty when not sent.
	ServiceAccount string
	// Cluster and Network are metadata CLUSTER_ID and NETWORK, empty when not sent.
	Cluster mesh.ClusterID
	Network mesh.NetworkID
}

// maxNodeIDLen bounds the node ID the decoder looks at; Istio's IDs are well under it.
const maxNodeIDLen = 1024

// DecodeNode decodes an xDS node in Istio's convention strictly: the ID must have its four
// "~"-separated parts, a valid IP, a known type (sidecar or router), and every place that
// names the namespace must name the same one. It never panics; every refusal is an error
// naming the part at fault.
func DecodeNode(n *core.Node) (NodeClaim, error) {
	if n == nil || n.GetId() == "" {
		return NodeClaim{}, fmt.Errorf("xDS node has no ID")
	}
	id := n.GetId()
	if len(id) > maxNodeIDLen {
		return NodeClaim{}, fmt.Errorf("xDS node ID is %d bytes, longer than %d", len(id), maxNodeIDLen)
	}
	parts := strings.Split(id, "~")
	if len(parts) != 4 {
		return NodeClaim{}, fmt.Errorf("node %q: want <type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>", id)
	}
	c := NodeClaim{ID: id}
	switch parts[0] {
	case "sidecar":
		c.Kind = ProxySidecar
	case "router":
		c.Kind = ProxyGateway
	default:
		return NodeClaim{}, fmt.Errorf("node %q: type %q is neither sidecar nor router", id, parts[0])
	}
	ip, err := netip.ParseAddr(parts[1])
	if err != nil {
		return NodeClaim{}, fmt.Errorf("node %q: address: %w", id, err)
	}
	c.IP = ip
	fields := n.GetMetadata().GetFields()
	if fields[MetaGenerator].GetStringValue() == "grpc" {
		if c.Kind == ProxyGateway {
			return NodeClaim{}, fmt.Errorf("node %q: a router cannot be a proxyless gRPC client", id)
		}
		c.Kind = ProxyGRPC
	}
	// Every source of the namespace must agree: a proxy cannot name one namespace in its
	// ID and another in its metadata and be judged on the friendlier one.
	var names []string
	pod, ns, hasNS := strings.Cut(parts[2], ".")
	c.Pod = pod
	if hasNS {
		names = append(names, ns)
	}
	if first, _, ok := strings.Cut(parts[3], "."); ok && strings.Contains(parts[3], ".svc") {
		names = append(names, first)
	}
	if v := fields[MetaNamespace].GetStringValue(); v != "" {
		names = append(names, v)
	}
	if c.Pod == "" {
		return NodeClaim{}, fmt.Errorf("node %q: no pod name", id)
	}
	if len(names) == 0 {
		return NodeClaim{}, fmt.Errorf("node %q: names no namespace (ID <pod>.<namespace>, domain <namespace>.svc..., or metadata %s)", id, MetaNamespace)
	}
	for _, v := range names[1:] {
		if v != names[0] {
			return NodeClaim{}, fmt.Errorf("node %q: names two namespaces, %q and %q", id, names[0], v)
		}
	}
	if _, err := mesh.NewIdentity("cluster.local", names[0], "x"); err != nil {
		return NodeClaim{}, fmt.Errorf("node %q: %w", id, err)
	}
	c.Namespace = names[0]
	c.ServiceAccount = fields[MetaServiceAccount].GetStringValue()
	if v := fields[MetaClusterID].GetStringValue(); v != "" {
		if c.Cluster, err = mesh.ParseClusterID(v); err != nil {
			return NodeClaim{}, fmt.Errorf("node %q: metadata %s: %w", id, MetaClusterID, err)
		}
	}
	if v := fields[MetaNetwork].GetStringValue(); v != "" {
		if c.Network, err = mesh.ParseNetworkID(v); err != nil {
			return NodeClaim{}, fmt.Errorf("node %q: metadata %s: %w", id, MetaNetwork, err)
		}
	}
	return c, nil
}
