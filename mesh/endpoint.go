package mesh

import (
	"fmt"
	"net/netip"
	"strconv"
)

// Protocol is an application protocol a port speaks, from the Service port's appProtocol
// or Istio's port-name prefix convention ("grpc-echo", "http", "tcp-db").
type Protocol string

// Protocols Isthmus distinguishes. Unknown is treated as opaque TCP.
const (
	ProtocolUnknown Protocol = ""
	ProtocolTCP     Protocol = "TCP"
	ProtocolHTTP    Protocol = "HTTP"
	ProtocolHTTP2   Protocol = "HTTP2"
	ProtocolGRPC    Protocol = "GRPC"
	ProtocolTLS     Protocol = "TLS"
)

// Port is one named port of an endpoint.
type Port struct {
	Name     string
	Number   uint16
	Protocol Protocol
}

// Health is an endpoint's readiness as the control plane last saw it.
type Health uint8

// Health values. The zero value is HealthUnknown so that a forgotten field never
// pretends an endpoint is healthy.
const (
	HealthUnknown Health = iota
	HealthHealthy
	HealthUnhealthy
	HealthDraining
)

// String returns the lowercase name of h.
func (h Health) String() string {
	switch h {
	case HealthHealthy:
		return "healthy"
	case HealthUnhealthy:
		return "unhealthy"
	case HealthDraining:
		return "draining"
	default:
		return "unknown"
	}
}

// Endpoint is one workload instance behind a service, with everything the control plane
// needs to route to it from anywhere in the mesh.
type Endpoint struct {
	Address  netip.Addr // the pod (or VM) IP; must be valid
	Ports    []Port     // the service ports this endpoint serves
	Cluster  ClusterID  // the cluster it was discovered in; required
	Network  NetworkID  // its network; empty means "the same network as everyone"
	Locality Locality
	Identity Identity // who it runs as; zero when unknown
	Weight   uint32   // relative load-balancing weight; 0 is normalised to 1
	Health   Health
	// MTLSReady says the endpoint can terminate Isthmus mTLS. Endpoints on other networks
	// that cannot are unreachable through a passthrough gateway and are dropped.
	MTLSReady bool
	// Labels are the workload's (pod's) labels, which DestinationRule subsets select on;
	// nil when unknown. The map is shared and must not be modified.
	Labels map[string]string
}

// Validate reports the first problem that makes e unusable.
func (e *Endpoint) Validate() error {
	if !e.Address.IsValid() {
		return fmt.Errorf("mesh: endpoint: missing address")
	}
	if e.Cluster == "" {
		return fmt.Errorf("mesh: endpoint %s: missing cluster", e.Address)
	}
	seen := make(map[string]bool, len(e.Ports))
	for _, p := range e.Ports {
		if p.Number == 0 {
			return fmt.Errorf("mesh: endpoint %s: port %q has number 0", e.Address, p.Name)
		}
		if seen[p.Name] {
			return fmt.Errorf("mesh: endpoint %s: duplicate port name %q", e.Address, p.Name)
		}
		seen[p.Name] = true
	}
	return nil
}

// EffectiveWeight returns Weight, or 1 when it is unset.
func (e *Endpoint) EffectiveWeight() uint32 {
	if e.Weight == 0 {
		return 1
	}
	return e.Weight
}

// AddrPort returns the endpoint's socket address for the named port.
func (e *Endpoint) AddrPort(portName string) (netip.AddrPort, bool) {
	for _, p := range e.Ports {
		if p.Name == portName {
			return netip.AddrPortFrom(e.Address, p.Number), true
		}
	}
	return netip.AddrPort{}, false
}

// String returns a short human form, "10.0.0.5@cluster-1/net-1".
func (e *Endpoint) String() string {
	s := e.Address.String() + "@" + string(e.Cluster)
	if e.Network != "" {
		s += "/" + string(e.Network)
	}
	if e.Weight > 1 {
		s += "(w" + strconv.FormatUint(uint64(e.Weight), 10) + ")"
	}
	return s
}
