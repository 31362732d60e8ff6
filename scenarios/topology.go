package scenarios

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Control-plane roles of a cluster.
const (
	// RolePrimary runs a control plane that watches its own cluster and every other
	// primary's cluster (primary clusters with endpoint discovery).
	RolePrimary = "primary"
	// RoleRemote runs no control plane; its workloads use the primary named in
	// ControlPlane.Primary.
	RoleRemote = "remote"
	// RoleConfig is the config cluster of an external control plane: a primary runs for
	// it as a process outside every mesh cluster, holding only the cluster's
	// `remote-secret create --type config` credential (external.go).
	RoleConfig = "config"
)

// Trust models.
const (
	// TrustSingle is one root with an intermediate per primary cluster.
	TrustSingle = "single"
)

// Topology is one deployment model: the clusters and networks to create, who runs the
// control plane, the workloads, and which clusters each client must reach. It is read
// from YAML with Parse and checked with Validate.
type Topology struct {
	// Name names the scenario (a DNS label).
	Name string `json:"name"`
	// Description says in a sentence what the scenario shows.
	Description string `json:"description,omitempty"`
	// Mesh is the mesh every cluster belongs to. A topology of several meshes lists them
	// in Meshes instead (meshes.go), and each cluster names its own.
	Mesh MeshSpec `json:"mesh,omitzero"`
	// Meshes, Peerings and Exports make a federation of whole meshes (meshes.go,
	// docs/federation.md): meshes with their own IDs, trust domains and control planes,
	// peered by token, each exporting services to named peers.
	Meshes   []MeshSpec    `json:"meshes,omitempty"`
	Peerings []PeeringSpec `json:"peerings,omitempty"`
	Exports  []ExportSpec  `json:"exports,omitempty"`
	// Trust is the trust model: TrustSingle (empty) or TrustMulti.
	Trust string `json:"trust,omitempty"`
	// Federation lists, for TrustMulti, which primaries fetch which other clusters' trust
	// bundles (one direction each).
	Federation []FederationSpec `json:"federation,omitempty"`
	// Networks are the networks clusters are on.
	Networks []NetworkSpec `json:"networks"`
	// Clusters are the Kubernetes clusters.
	Clusters []ClusterSpec `json:"clusters"`
	// Workloads are the services and where their replicas run.
	Workloads []WorkloadSpec `json:"workloads"`
	// Expect lists, per client cluster and service, the clusters that must answer.
	Expect []Expectation `json:"expect"`

	// Faults, Load, Phases and Tuning make a fault scenario (fault.go, load.go,
	// phases.go): faults applied on a schedule while every client calls every service,
	// with expectations per phase.
	Faults []FaultSpec        `json:"faults,omitempty"`
	Load   LoadSpec           `json:"load,omitzero"`
	Phases []PhaseExpectation `json:"phases,omitempty"`
	Tuning TuningSpec         `json:"tuning,omitzero"`

	// Traffic makes a traffic-management scenario (traffic.go): Istio configuration
	// applied to every primary's cluster, and checks measured from the clients.
	Traffic *TrafficSpec `json:"traffic,omitempty"`

	// Ingress makes an ingress scenario (ingress.go): an ingress gateway configured by
	// Istio's Gateway, and checks made with curl from outside every mesh network.
	Ingress *IngressSpec `json:"ingress,omitempty"`
}

// MeshSpec names the mesh.
type MeshSpec struct {
	// ID is the mesh ID; default "mesh1".
	ID string `json:"id,omitempty"`
	// TrustDomain of every workload identity; default "cluster.local".
	TrustDomain string `json:"trustDomain,omitempty"`
}

// NetworkSpec is one network: pods on it reach each other directly.
type NetworkSpec struct {
	// Name is the network ID (topology.istio.io/network).
	Name string `json:"name"`
	// Gateway runs an east-west gateway for the network, through which other networks
	// reach its pods. A network without one cannot be reached from outside.
	Gateway bool `json:"gateway,omitempty"`
}

// ClusterSpec is one cluster.
type ClusterSpec struct {
	// Name is the cluster ID.
	Name string `json:"name"`
	// Network the cluster's pods are on.
	Network string `json:"network"`
	// Region and Zone label the cluster's node, giving its endpoints their locality.
	Region string `json:"region,omitempty"`
	Zone   string `json:"zone,omitempty"`
	// PodCIDR is where the cluster's pod addresses come from. Pod CIDRs of clusters on
	// one network must not overlap (their pods reach each other directly).
	PodCIDR string `json:"podCIDR"`
	// ServiceCIDR is the cluster's ClusterIP range; default 10.96.0.0/16.
	ServiceCIDR string `json:"serviceCIDR,omitempty"`
	// ControlPlane says whether the cluster runs a primary.
	ControlPlane ControlPlaneSpec `json:"controlPlane"`
	// TrustDomain of the cluster's workloads; default the mesh's. Clusters may differ only
	// with trust: multi.
	TrustDomain string `json:"trustDomain,omitempty"`
	// Mesh names the cluster's mesh, one of Topology.Meshes; required with meshes and
	// only then.
	Mesh string `json:"mesh,omitempty"`
}

// ControlPlaneSpec is a cluster's control-plane role.
type ControlPlaneSpec struct {
	// Role is RolePrimary or RoleRemote.
	Role string `json:"role"`
	// Primary names the primary cluster a remote cluster uses; only for RoleRemote.
	Primary string `json:"primary,omitempty"`
}

// WorkloadSpec is a service and its replicas.
type WorkloadSpec struct {
	// Service is the Service's name.
	Service string `json:"service"`
	// Namespace is the Service's namespace (namespace sameness: the same in every cluster).
	Namespace string `json:"namespace"`
	// Port is the gRPC port; default 8080.
	Port int `json:"port,omitempty"`
	// Replicas maps cluster names to how many pods run there. The Service exists in every
	// cluster listed, also with 0 replicas.
	Replicas map[string]int `json:"replicas"`
	// XDSServer makes the pods serve through grpc-go's xds.NewGRPCServer (`isthmus
	// workload --xds-server`): mTLS, AuthorizationPolicy and PeerAuthentication come from
	// the primary's inbound Listener.
	XDSServer bool `json:"xdsServer,omitempty"`
	// Labels are extra pod labels per cluster (e.g. version: v1 in cluster-1), which
	// DestinationRule subsets select on.
	Labels map[string]map[string]string `json:"labels,omitempty"`
	// HTTPPort, when set, makes the pods also serve HTTP with mTLS on this port, the
	// Service's port "http" (the ingress scenario's backends); it must differ from Port.
	HTTPPort int `json:"httpPort,omitempty"`
}

// Expectation says which clusters must answer a client in From calling Service.
type Expectation struct {
	// From is the client's cluster.
	From string `json:"from"`
	// Service is "<name>.<namespace>".
	Service string `json:"service"`
	// Reach lists the clusters that must answer; every other cluster must not.
	Reach []string `json:"reach"`
	// CallerIdentity is the SPIFFE ID every server must see for the client; default the
	// probe client's identity in From's trust domain.
	CallerIdentity string `json:"callerIdentity,omitempty"`
	// ServerIdentities maps answering clusters to the SPIFFE ID their servers must
	// present; default the service's account in that cluster's trust domain.
	ServerIdentities map[string]string `json:"serverIdentities,omitempty"`
	// Mesh is the mesh whose Service is called; default From's own. Another mesh's
	// service is called by its import name, <name>.<namespace>.svc.<mesh>.isthmus, and
	// Reach then lists clusters of that mesh.
	Mesh string `json:"mesh,omitempty"`
}

// Parse reads a topology from YAML (or JSON). Unknown fields are errors, so a misspelt
// key never silently changes a scenario. Parse does not validate.
func Parse(data []byte) (*Topology, error) {
	var t Topology
	if err := yaml.UnmarshalStrict(data, &t); err != nil {
		return nil, fmt.Errorf("scenarios: parse topology: %w", err)
	}
	return &t, nil
}

// ValidationError lists every problem of a topology, each with its place.
type ValidationError struct {
	Problems []string
}

func (e *ValidationError) Error() string {
	return "scenarios: invalid topology:\n  " + strings.Join(e.Problems, "\n  ")
}

// Validate checks the topology as a whole and fills in defaults (mesh ID, trust domain,
// trust model, service CIDRs, ports). It returns a *ValidationError naming every problem.
func (t *Topology) Validate() error {
	var p []string
	add := func(format string, args ...any) { p = append(p, fmt.Sprintf(format, args...)) }

	if err := checkName(t.Name); err != nil {
		add("name: %v", err)
	}
	if len(t.Meshes) > 0 {
		if t.Mesh != (MeshSpec{}) {
			add("mesh: give either mesh (one mesh) or meshes (a federation), not both")
		}
	} else {
		if t.Mesh.ID == "" {
			t.Mesh.ID = "mesh1"
		}
		if _, err := mesh.ParseMeshID(t.Mesh.ID); err != nil {
			add("mesh.id: %v", err)
		}
		if t.Mesh.TrustDomain == "" {
			t.Mesh.TrustDomain = "cluster.local"
		}
		if _, err := mesh.ParseTrustDomain(t.Mesh.TrustDomain); err != nil {
			add("mesh.trustDomain: %v", err)
		}
	}

	networks := map[string]NetworkSpec{}
	for i, n := range t.Networks {
		if _, err := mesh.ParseNetworkID(n.Name); err != nil {
			add("networks[%d].name: %v", i, err)
		} else if _, dup := networks[n.Name]; dup {
			add("networks[%d].name: duplicate network %q", i, n.Name)
		}
		networks[n.Name] = n
	}
	if len(t.Networks) == 0 {
		add("networks: at least one network is required")
	}

	clusters := map[string]ClusterSpec{}
	podCIDRs := map[string]netip.Prefix{}
	for i, c := range t.Clusters {
		if _, err := mesh.ParseClusterID(c.Name); err != nil {
			add("clusters[%d].name: %v", i, err)
		} else if err := checkName(c.Name); err != nil {
			add("clusters[%d].name: %v", i, err)
		} else if _, dup := clusters[c.Name]; dup {
			add("clusters[%d].name: duplicate cluster %q", i, c.Name)
		}
		clusters[c.Name] = c
		if _, ok := networks[c.Network]; !ok {
			add("clusters[%d].network: unknown network %q", i, c.Network)
		}
		if pfx, err := netip.ParsePrefix(c.PodCIDR); err != nil || !pfx.Addr().Is4() || pfx.Bits() > 24 {
			add("clusters[%d].podCIDR: %q is not an IPv4 prefix of /24 or wider", i, c.PodCIDR)
		} else {
			podCIDRs[c.Name] = pfx.Masked()
		}
		if c.ServiceCIDR == "" {
			t.Clusters[i].ServiceCIDR = "10.96.0.0/16"
		} else if _, err := netip.ParsePrefix(c.ServiceCIDR); err != nil {
			add("clusters[%d].serviceCIDR: %v", i, err)
		}
		switch c.ControlPlane.Role {
		case RolePrimary, RoleConfig:
			if c.ControlPlane.Primary != "" {
				add("clusters[%d].controlPlane.primary: only a remote cluster names a primary", i)
			}
		case RoleRemote:
			add2 := checkRemote(t, c)
			for _, m := range add2 {
				add("clusters[%d].controlPlane: %s", i, m)
			}
		default:
			add("clusters[%d].controlPlane.role: %q (want %q, %q or %q)", i, c.ControlPlane.Role, RolePrimary, RoleRemote, RoleConfig)
		}
	}
	if len(t.Clusters) == 0 {
		add("clusters: at least one cluster is required")
	}
	// Pods of clusters on one network reach each other directly, so their addresses
	// must be distinct.
	for i, a := range t.Clusters {
		for _, b := range t.Clusters[i+1:] {
			pa, oka := podCIDRs[a.Name]
			pb, okb := podCIDRs[b.Name]
			if oka && okb && a.Network == b.Network && a.Name != b.Name && pa.Overlaps(pb) {
				add("clusters %q and %q: pod CIDRs %s and %s overlap on network %q", a.Name, b.Name, pa, pb, a.Network)
			}
		}
	}

	services := map[string]WorkloadSpec{}
	for i, w := range t.Workloads {
		if err := checkName(w.Service); err != nil {
			add("workloads[%d].service: %v", i, err)
		}
		if err := checkName(w.Namespace); err != nil {
			add("workloads[%d].namespace: %v", i, err)
		}
		if w.Port == 0 {
			t.Workloads[i].Port = 8080
		} else if w.Port < 1 || w.Port > 65535 {
			add("workloads[%d].port: %d is not a port", i, w.Port)
		}
		if w.HTTPPort != 0 && (w.HTTPPort < 1 || w.HTTPPort > 65535 || w.HTTPPort == t.Workloads[i].Port) {
			add("workloads[%d].httpPort: %d is not a port other than the gRPC port %d", i, w.HTTPPort, t.Workloads[i].Port)
		}
		key := w.Service + "." + w.Namespace
		if _, dup := services[key]; dup {
			add("workloads[%d]: duplicate service %q", i, key)
		}
		services[key] = w
		if len(w.Replicas) == 0 {
			add("workloads[%d].replicas: name at least one cluster", i)
		}
		for _, c := range slices.Sorted(maps.Keys(w.Replicas)) {
			if _, ok := clusters[c]; !ok {
				add("workloads[%d].replicas: unknown cluster %q", i, c)
			}
			if n := w.Replicas[c]; n < 0 || n > 50 {
				add("workloads[%d].replicas[%s]: %d is not between 0 and 50", i, c, n)
			}
		}
	}

	for i, e := range t.Expect {
		from, ok := clusters[e.From]
		if !ok {
			add("expect[%d].from: unknown cluster %q", i, e.From)
		}
		w, ok := services[e.Service]
		if !ok {
			add("expect[%d].service: unknown service %q (want <name>.<namespace> of a workload)", i, e.Service)
		}
		target := cmp.Or(e.Mesh, from.Mesh)
		for _, c := range e.Reach {
			to, known := clusters[c]
			switch {
			case !known:
				add("expect[%d].reach: unknown cluster %q", i, c)
			case ok && w.Replicas[c] == 0:
				add("expect[%d].reach: %q runs no replica of %s", i, c, e.Service)
			case to.Mesh != target:
				add("expect[%d].reach: %q is in mesh %q, not %q whose %s is called", i, c, to.Mesh, target, e.Service)
			case from.Network != "" && to.Network != from.Network && !networks[to.Network].Gateway:
				add("expect[%d].reach: %q is on network %q, which has no gateway, so %q cannot reach it", i, c, to.Network, e.From)
			}
		}
	}

	t.validateMeshes(add)
	t.validateFaults(add)
	t.validateLoad(add)
	t.validatePhases(add, clusters, services)
	t.validateTrust(add)
	t.validateTraffic(add, clusters, services)
	t.validateIngress(add, clusters)

	if len(p) > 0 {
		return &ValidationError{Problems: p}
	}
	return nil
}

// Cluster returns the cluster named name.
func (t *Topology) Cluster(name string) (ClusterSpec, bool) {
	for _, c := range t.Clusters {
		if c.Name == name {
			return c, true
		}
	}
	return ClusterSpec{}, false
}

// Network returns the network named name.
func (t *Topology) Network(name string) (NetworkSpec, bool) {
	for _, n := range t.Networks {
		if n.Name == name {
			return n, true
		}
	}
	return NetworkSpec{}, false
}

// MultiNetwork reports whether the topology has more than one network.
func (t *Topology) MultiNetwork() bool { return len(t.Networks) > 1 }

// Hostname returns the service's cluster-local hostname for "<name>.<namespace>".
func Hostname(service string) string { return service + ".svc.cluster.local" }

// checkName accepts a DNS label: what Kubernetes needs of namespace and Service names and
// what the runner needs of cluster names (they name directories and network namespaces).
func checkName(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	if len(s) > 40 {
		return fmt.Errorf("%q is longer than 40 characters", s)
	}
	for i, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(s)-1
		if !ok {
			return fmt.Errorf("%q is not a DNS label (lower-case letters, digits, inner '-')", s)
		}
	}
	return nil
}
