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
	// ProxyIngress is an ingress gateway (istio-ingressgateway, isthmus proxy --mode
	// ingress): listeners from the Gateways that select its labels (ingress.go).
	ProxyIngress ProxyKind = "ingress"
)

// Node metadata keys, in Istio's spelling so that Istio's agents describe themselves the
// same way.
const (
	MetaClusterID = "CLUSTER_ID"
	MetaNetwork   = "NETWORK"
	MetaGenerator = "GENERATOR" // "grpc" for proxyless gRPC clients
	// MetaLabels is the pod's labels (a struct of strings); a router that sends them, and
	// whose MetaRouterMode is not "sni-dnat", is an ingress gateway.
	MetaLabels     = "LABELS"
	MetaRouterMode = "ROUTER_MODE"
)

// Proxy is a connected xDS client as the primary understands it.
type Proxy struct {
	ID      string         `json:"id"`
	Kind    ProxyKind      `json:"kind"`
	Cluster mesh.ClusterID `json:"cluster,omitempty"`
	Network mesh.NetworkID `json:"network,omitempty"`
	// Locality is the node's locality (core.Node.locality), a claim on either port: it
	// only decides which endpoints the proxy prefers, never which it may reach.
	Locality mesh.Locality `json:"locality,omitzero"`
	// Namespace, Identity (a SPIFFE ID) and Auth (AuthCertificate or AuthToken) are what
	// the secure port authenticated; empty on the plaintext port.
	Namespace string `json:"namespace,omitempty"`
	Identity  string `json:"identity,omitempty"`
	Auth      string `json:"auth,omitempty"`
	// ConfigNamespace is the namespace the node names (metadata NAMESPACE, else the node
	// ID's "<pod>.<namespace>"), a claim on either port (the secure port refuses a claim
	// that differs from what it authenticated). It only picks the Sidecar that narrows
	// the proxy's view, never what it may reach.
	ConfigNamespace string `json:"configNamespace,omitempty"`
	// Peer is the address the stream came from: the proxy itself, or the gateway that
	// forwarded it (secure port only).
	Peer string `json:"peer,omitempty"`
	// Workload is the Sidecar with workloadSelector that selects the proxy's pod (as the
	// primary knows the pod, workload.go), as of the proxy's last request; empty for none.
	Workload string `json:"workload,omitempty"`
	// Labels are an ingress gateway's labels (canonicalLabels), which select the
	// Gateways that apply to it; a claim, like ConfigNamespace.
	Labels string `json:"labels,omitempty"`
	// Path is how the stream reached the primary: "direct", or "via gateway <network>"
	// when it came through a gateway listener (SecureOptions) or from a known network
	// gateway's address (secure port only).
	Path string `json:"path,omitempty"`
}

// ViewKey is what makes two proxies' configuration differ. Every proxy with the same key
// gets the very same snapshot, built and marshalled once.
type ViewKey struct {
	Kind    ProxyKind
	Network mesh.NetworkID
	// Locality is the proxy's own (its node's), which DestinationRules with outlier
	// detection turn into endpoint priorities; zero when the node names none.
	Locality mesh.Locality
	// Namespace is the proxy's namespace (its node's), which decides the Sidecar that
	// scopes its view (sidecarscope.go); empty for gateways, which no Sidecar scopes,
	// and for nodes that name none.
	Namespace string
	// Workload is the name of the Sidecar with workloadSelector (of Namespace) that
	// selects the proxy's pod, set only when one does (sidecarscope.go, workload.go): the
	// proxies no such Sidecar selects keep sharing their namespace's view.
	Workload string
	// Labels are an ingress gateway's labels ("k=v,k=v", sorted), which select its
	// Gateways; empty for every other kind.
	Labels string
}

// String returns "kind/network", followed by "@region/zone/subzone" when the proxy has
// a locality, "~namespace" when it has a namespace, ":workload" when a Sidecar with
// workloadSelector scopes it and "#labels" when it has labels.
func (k ViewKey) String() string {
	s := string(k.Kind) + "/" + string(k.Network)
	if k.Locality != (mesh.Locality{}) {
		s += "@" + k.Locality.String()
	}
	if k.Namespace != "" {
		s += "~" + k.Namespace
	}
	if k.Workload != "" {
		s += ":" + k.Workload
	}
	if k.Labels != "" {
		s += "#" + k.Labels
	}
	return s
}

// ParseViewKey parses ViewKey.String's form.
func ParseViewKey(s string) (ViewKey, error) {
	s, lbls, _ := strings.Cut(s, "#")
	s, ns, _ := strings.Cut(s, "~")
	ns, workload, _ := strings.Cut(ns, ":") // neither namespace nor Sidecar names hold ':'
	rest, loc, _ := strings.Cut(s, "@")
	kind, network, _ := strings.Cut(rest, "/")
	l, err := mesh.ParseLocality(loc)
	if err != nil {
		return ViewKey{}, fmt.Errorf("view %q: %w", s, err)
	}
	return ViewKey{Kind: ProxyKind(kind), Network: mesh.NetworkID(network), Locality: l, Namespace: ns, Workload: workload, Labels: lbls}, nil
}

// Key returns the proxy's view key. A gateway's carries no namespace: no Sidecar
// scopes it, so every gateway of a network shares one view.
func (p Proxy) Key() ViewKey {
	k := ViewKey{Kind: p.Kind, Network: p.Network, Locality: p.Locality}
	if p.Kind != ProxyGateway {
		k.Namespace = p.ConfigNamespace
	}
	if p.Kind == ProxyGRPC || p.Kind == ProxySidecar {
		k.Workload = p.Workload
	}
	if p.Kind == ProxyIngress {
		k.Labels = p.Labels
	}
	return k
}

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
	// A malformed NAMESPACE is refused; an ID outside Istio's convention just names no
	// namespace (the plaintext port has always accepted such IDs).
	if v := fields[MetaNamespace].GetStringValue(); v != "" {
		if _, err := mesh.NewIdentity("cluster.local", v, "x"); err != nil {
			return Proxy{}, fmt.Errorf("node %s: metadata %s: %w", n.GetId(), MetaNamespace, err)
		}
		p.ConfigNamespace = v
	} else if parts := strings.Split(n.GetId(), "~"); len(parts) == 4 {
		// The places DecodeNode reads, in its order, so that on the secure port (where
		// they must agree) this is the authenticated namespace.
		_, ns, ok := strings.Cut(parts[2], ".")
		if first, _, dok := strings.Cut(parts[3], "."); !ok && dok && strings.Contains(parts[3], ".svc") {
			ns, ok = first, true
		}
		if _, err := mesh.NewIdentity("cluster.local", ns, "x"); ok && err == nil {
			p.ConfigNamespace = ns
		}
	}
	if p.Kind == ProxyGateway {
		lbls, err := ingressLabels(fields)
		if err != nil {
			return Proxy{}, fmt.Errorf("node %s: %w", n.GetId(), err)
		}
		if lbls != "" {
			p.Kind, p.Labels = ProxyIngress, lbls
		}
	}
	if l := n.GetLocality(); l != nil {
		loc, err := mesh.ParseLocality(strings.TrimRight(l.GetRegion()+"/"+l.GetZone()+"/"+l.GetSubZone(), "/"))
		if err != nil {
			return Proxy{}, fmt.Errorf("node %s: locality: %w", n.GetId(), err)
		}
		p.Locality = loc
	}
	return p, nil
}
