package primary

import (
	"net/netip"
	"slices"
	"strings"

	"istio.io/api/label"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Labels Isthmus reads, exactly as Istio spells them: istio.io/api/label publishes the
// names, so a typo here cannot make a cluster silently lose its network.
var (
	// LabelNetwork (topology.istio.io/network) on a pod, a namespace or the system
	// namespace names the network; on a Service with port GatewayPort it marks that
	// network's east-west gateway.
	LabelNetwork = label.TopologyNetwork.Name
	// LabelTLSMode (security.istio.io/tlsMode) set to TLSModeIstio on a pod says its
	// workload terminates Isthmus mTLS, which is what lets other networks reach it.
	LabelTLSMode = label.SecurityTlsMode.Name
)

// TLSModeIstio is the LabelTLSMode value of a workload that speaks Isthmus (Istio) mTLS.
// istio.io/api publishes no constant for it.
const TLSModeIstio = "istio"

// GatewayPort is where east-west gateways take cross-network mTLS (Istio's 15443): a
// Service labelled with a network and exposing this port is that network's gateway, and an
// Envoy gateway's AUTO_PASSTHROUGH listener binds it.
const GatewayPort = 15443

// NetworkCIDR assigns addresses in Prefix to Network when neither pod nor namespace says.
type NetworkCIDR struct {
	Prefix  netip.Prefix
	Network mesh.NetworkID
}

// translator turns one cluster's Kubernetes objects into registry values. It is pure: all
// lookups are functions over the watcher's caches, so tests feed it plain objects.
type translator struct {
	cluster        mesh.ClusterID
	defaultNetwork mesh.NetworkID // the cluster's network when nothing more specific says
	trustDomain    mesh.TrustDomain
	domain         string
	cidrs          []NetworkCIDR

	pod       func(namespace, name string) *corev1.Pod
	node      func(name string) *corev1.Node
	namespace func(name string) *corev1.Namespace
}

// protocolOf derives a port's protocol from appProtocol or Istio's name-prefix convention.
// appProtocol, when set, wins over the name (as in Istio); matching is case-insensitive
// and on the part before the first '-', so "grpc-echo" is gRPC. Anything else is
// ProtocolUnknown, which is treated as opaque TCP.
func protocolOf(p corev1.ServicePort) mesh.Protocol {
	name := strings.ToLower(p.Name)
	if p.AppProtocol != nil {
		name = strings.ToLower(*p.AppProtocol)
	}
	prefix, _, _ := strings.Cut(name, "-")
	switch prefix {
	case "grpc", "grpc-web", "kubernetes.io/h2c":
		return mesh.ProtocolGRPC
	case "http":
		return mesh.ProtocolHTTP
	case "http2", "h2c":
		return mesh.ProtocolHTTP2
	case "tls", "https":
		return mesh.ProtocolTLS
	case "tcp":
		return mesh.ProtocolTCP
	}
	return mesh.ProtocolUnknown
}

// service translates a Service; ok is false for services that never leave their cluster
// (ExternalName) or have no usable port. Only TCP ports are kept: UDP and SCTP are not
// meshed. A headless Service has no VIP (svc.VIP stays invalid).
func (t *translator) service(s *corev1.Service) (*Service, bool) {
	if s.Spec.Type == corev1.ServiceTypeExternalName {
		return nil, false
	}
	key := mesh.ServiceKey{Namespace: s.Namespace, Name: s.Name}
	svc := &Service{Hostname: key.Hostname(t.domain), Key: key}
	if ip, err := netip.ParseAddr(s.Spec.ClusterIP); err == nil {
		svc.VIP = ip
	}
	for _, p := range s.Spec.Ports {
		if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
			continue // UDP and SCTP are not meshed
		}
		svc.Ports = append(svc.Ports, ServicePort{Name: p.Name, Port: uint16(p.Port), Protocol: protocolOf(p)})
	}
	return svc, len(svc.Ports) > 0
}

// endpoints translates a service's EndpointSlices (IPv4 and IPv6 alike), joining each
// address with its Pod (identity, network label, mTLS readiness) and Node (locality).
// Slice ports are matched to Service ports by name, which is how EndpointSlices name
// them; an address in several slices (during a slice's replacement) counts once, the
// first seen. The result is sorted by address, so the registry sees no change when only
// the order of slices did.
func (t *translator) endpoints(svc *corev1.Service, eps []*discoveryv1.EndpointSlice) []mesh.Endpoint {
	// Map each slice port to the service port it serves, by name.
	svcPorts := map[string]corev1.ServicePort{}
	for _, p := range svc.Spec.Ports {
		svcPorts[p.Name] = p
	}
	var out []mesh.Endpoint
	seen := map[netip.Addr]bool{}
	for _, slice := range eps {
		if slice.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		var ports []mesh.Port
		for _, p := range slice.Ports {
			if p.Port == nil || (p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP) {
				continue
			}
			name := ""
			if p.Name != nil {
				name = *p.Name
			}
			sp, ok := svcPorts[name]
			if !ok {
				continue
			}
			ports = append(ports, mesh.Port{Name: name, Number: uint16(*p.Port), Protocol: protocolOf(sp)})
		}
		if len(ports) == 0 {
			continue
		}
		for _, e := range slice.Endpoints {
			for _, a := range e.Addresses {
				addr, err := netip.ParseAddr(a)
				if err != nil || seen[addr] {
					continue
				}
				seen[addr] = true
				out = append(out, t.endpoint(addr, e, ports))
			}
		}
	}
	slices.SortFunc(out, func(a, b mesh.Endpoint) int { return a.Address.Compare(b.Address) })
	return out
}

// endpoint builds one address's endpoint. The identity is the pod's service account
// ("default" when unset, as Kubernetes does) in the configured trust domain; without a
// pod (no targetRef, or not in the cache yet) there is no identity and no mTLS. Locality
// comes from the node's topology labels, falling back to the slice's zone hint.
func (t *translator) endpoint(addr netip.Addr, e discoveryv1.Endpoint, ports []mesh.Port) mesh.Endpoint {
	ep := mesh.Endpoint{Address: addr, Ports: ports, Cluster: t.cluster, Health: health(e.Conditions)}
	var pod *corev1.Pod
	if e.TargetRef != nil && e.TargetRef.Kind == "Pod" && t.pod != nil {
		pod = t.pod(e.TargetRef.Namespace, e.TargetRef.Name)
	}
	var nsLabels map[string]string
	if pod != nil {
		if ns := t.namespace(pod.Namespace); ns != nil {
			nsLabels = ns.Labels
		}
		sa := pod.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		if id, err := mesh.NewIdentity(t.trustDomain, pod.Namespace, sa); err == nil {
			ep.Identity = id
		}
		ep.MTLSReady = pod.Labels[LabelTLSMode] == TLSModeIstio
		ep.Labels = pod.Labels // subsets select on them; informer objects are not mutated
	}
	ep.Network = t.networkOf(addr, pod, nsLabels)
	nodeName := ""
	if e.NodeName != nil {
		nodeName = *e.NodeName
	} else if pod != nil {
		nodeName = pod.Spec.NodeName
	}
	if node := t.nodeOrNil(nodeName); node != nil {
		ep.Locality = mesh.Locality{
			Region:  node.Labels[corev1.LabelTopologyRegion],
			Zone:    node.Labels[corev1.LabelTopologyZone],
			Subzone: node.Labels[label.TopologySubzone.Name],
		}
	} else if e.Zone != nil {
		ep.Locality.Zone = *e.Zone
	}
	return ep
}

// nodeOrNil returns the named node, or nil when the name is empty or unknown.
func (t *translator) nodeOrNil(name string) *corev1.Node {
	if name == "" || t.node == nil {
		return nil
	}
	return t.node(name)
}

// networkOf resolves an endpoint's network: the pod's label, its namespace's label, the
// configured CIDR map (first matching prefix wins), then the cluster's default network.
// A label value that is not a valid network ID is ignored, as if absent.
func (t *translator) networkOf(addr netip.Addr, pod *corev1.Pod, nsLabels map[string]string) mesh.NetworkID {
	if pod != nil {
		if n, err := mesh.ParseNetworkID(pod.Labels[LabelNetwork]); err == nil {
			return n
		}
	}
	if n, err := mesh.ParseNetworkID(nsLabels[LabelNetwork]); err == nil {
		return n
	}
	for _, c := range t.cidrs {
		if c.Prefix.Contains(addr) {
			return c.Network
		}
	}
	return t.defaultNetwork
}

// health reads an endpoint's conditions. An unset Ready means ready, as the
// EndpointSlice API specifies; a not-ready terminating endpoint is draining.
func health(c discoveryv1.EndpointConditions) mesh.Health {
	switch {
	case c.Ready == nil || *c.Ready:
		return mesh.HealthHealthy
	case c.Terminating != nil && *c.Terminating:
		return mesh.HealthDraining
	default:
		return mesh.HealthUnhealthy
	}
}

// gatewaysOf returns the network gateways a Service describes: a Service labelled
// topology.istio.io/network with port GatewayPort, reached at its load-balancer ingress
// IPs or external IPs (hostnames are skipped: the primary sends addresses). A Service
// without an address yet describes no gateway.
func gatewaysOf(cluster mesh.ClusterID, s *corev1.Service) []Gateway {
	network, err := mesh.ParseNetworkID(s.Labels[LabelNetwork])
	if err != nil {
		return nil
	}
	hasPort := slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == GatewayPort })
	if !hasPort {
		return nil
	}
	var addrs []string
	for _, in := range s.Status.LoadBalancer.Ingress {
		addrs = append(addrs, in.IP)
	}
	addrs = append(addrs, s.Spec.ExternalIPs...)
	var out []Gateway
	for _, a := range addrs {
		if ip, err := netip.ParseAddr(a); err == nil {
			out = append(out, Gateway{Network: network, Address: ip, Port: GatewayPort, Cluster: cluster})
		}
	}
	return out
}
