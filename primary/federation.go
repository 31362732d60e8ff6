package primary

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"google.golang.org/protobuf/proto"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// FederationExports is what this mesh exports to peer meshes, as the gateways need it:
// the mesh's own ID (the domain peers name it by) and, per exported service, its exported
// port numbers. The zero value exports nothing.
type FederationExports struct {
	Mesh     mesh.MeshID
	Services map[mesh.ServiceKey][]uint16
}

// FederationHostname is the name peers give key of this mesh.
func (e FederationExports) FederationHostname(key mesh.ServiceKey) mesh.Hostname {
	return key.FederatedHostname(e.Mesh)
}

// MarshalJSON shows the set on /debug/registryz with "namespace/name" keys (a
// ServiceKey is not a JSON object key).
func (e FederationExports) MarshalJSON() ([]byte, error) {
	svcs := make(map[string][]uint16, len(e.Services))
	for k, p := range e.Services {
		svcs[k.String()] = p
	}
	return json.Marshal(struct {
		Mesh     mesh.MeshID         `json:"mesh,omitempty"`
		Services map[string][]uint16 `json:"services,omitempty"`
	}{e.Mesh, svcs})
}

// equal reports whether e and o export the same ports of the same services.
func (e FederationExports) equal(o FederationExports) bool {
	return e.Mesh == o.Mesh && maps.EqualFunc(e.Services, o.Services, slices.Equal[[]uint16])
}

// SetFederationExports replaces the export set (the federation endpoint's exports,
// adapted by cmd). Gateways' views then route each exported port under its federation
// name (see gatewayExportAliases); a set equal to the current one changes nothing.
func (r *Registry) SetFederationExports(e FederationExports) {
	cp := FederationExports{Mesh: e.Mesh, Services: make(map[mesh.ServiceKey][]uint16, len(e.Services))}
	for k, ports := range e.Services {
		cp.Services[k] = slices.Sorted(slices.Values(ports))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.exports.equal(cp) {
		return
	}
	r.exports = cp
	r.version++
	r.exportsGen = r.version
	r.notifyLocked()
}

// gatewayExportAliases returns, for a gateway view, a cluster and load assignment per
// exported service port named after the cluster a peer's client uses
// (outbound|<port>||<name>.<ns>.svc.<mesh>.isthmus, whose SNI is
// outbound_.<port>_._.<name>.<ns>.svc.<mesh>.isthmus) with the endpoints of the local
// service's cluster (outbound|<port>||<local hostname>) in this view, and the server
// names of the Envoy-style sni-dnat clusters. Only local services are aliased (a
// hostname already under .isthmus is an import from a peer and never re-exported), only
// the exported ports, and only the default subset: a peer's subset names nothing here.
func gatewayExportAliases(v *View, endpoints []types.Resource) (clusters, eps []types.Resource, snis []string) {
	if len(v.Exports.Services) == 0 {
		return nil, nil, nil
	}
	byName := make(map[string]*endpoint.ClusterLoadAssignment, len(endpoints))
	for _, r := range endpoints {
		if cla, ok := r.(*endpoint.ClusterLoadAssignment); ok {
			byName[cla.GetClusterName()] = cla
		}
	}
	for _, svc := range v.Services {
		if strings.HasSuffix(string(svc.Hostname), mesh.FederationDomainSuffix) {
			continue
		}
		ports, ok := v.Exports.Services[svc.Key]
		if !ok {
			continue
		}
		alias := v.Exports.FederationHostname(svc.Key)
		for _, p := range svc.Ports {
			if _, ok := slices.BinarySearch(ports, p.Port); !ok {
				continue
			}
			local := byName[mesh.OutboundName{Port: p.Port, Host: svc.Hostname}.ClusterName()]
			if local == nil {
				continue
			}
			out := mesh.OutboundName{Port: p.Port, Host: alias}
			for _, name := range []string{out.ClusterName(), out.SNI()} {
				cla := proto.Clone(local).(*endpoint.ClusterLoadAssignment)
				cla.ClusterName = name
				clusters = append(clusters, edsCluster(name))
				eps = append(eps, cla)
			}
			snis = append(snis, out.SNI())
		}
	}
	return clusters, eps, snis
}
