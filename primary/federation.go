package primary

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"google.golang.org/protobuf/proto"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// FederationExports is what this mesh exports to peer meshes, as the gateways and the
// servers need it: the mesh's own ID (the domain peers name it by); per exported service,
// its exported port numbers and the peer meshes it is exported to; and the live peers'
// trust domains. The zero value exports nothing and knows no peers.
//
// Gateways route every exported service to every peer (they pass TLS through and cannot
// tell peers apart); servers refuse a peer's callers, by the trust domain their
// certificate proves, on every service not exported to that peer (denyPeers).
type FederationExports struct {
	Mesh      mesh.MeshID
	Services  map[mesh.ServiceKey][]uint16
	Consumers map[mesh.ServiceKey][]mesh.MeshID
	Peers     map[mesh.MeshID]mesh.TrustDomain
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
	cons := make(map[string][]mesh.MeshID, len(e.Consumers))
	for k, c := range e.Consumers {
		cons[k.String()] = c
	}
	return json.Marshal(struct {
		Mesh      mesh.MeshID                      `json:"mesh,omitempty"`
		Services  map[string][]uint16              `json:"services,omitempty"`
		Consumers map[string][]mesh.MeshID         `json:"consumers,omitempty"`
		Peers     map[mesh.MeshID]mesh.TrustDomain `json:"peers,omitempty"`
	}{e.Mesh, svcs, cons, e.Peers})
}

// equal reports whether e and o export the same ports of the same services.
func (e FederationExports) equal(o FederationExports) bool {
	return e.Mesh == o.Mesh && maps.EqualFunc(e.Services, o.Services, slices.Equal[[]uint16]) &&
		maps.EqualFunc(e.Consumers, o.Consumers, slices.Equal[[]mesh.MeshID]) && maps.Equal(e.Peers, o.Peers)
}

// SetFederationExports replaces the export set (the federation endpoint's exports,
// adapted by cmd). Gateways' views then route each exported port under its federation
// name (see gatewayExportAliases); a set equal to the current one changes nothing.
func (r *Registry) SetFederationExports(e FederationExports) {
	cp := FederationExports{Mesh: e.Mesh, Services: make(map[mesh.ServiceKey][]uint16, len(e.Services)),
		Consumers: make(map[mesh.ServiceKey][]mesh.MeshID, len(e.Consumers)), Peers: maps.Clone(e.Peers)}
	for k, ports := range e.Services {
		cp.Services[k] = slices.Sorted(slices.Values(ports))
	}
	for k, c := range e.Consumers {
		cp.Consumers[k] = slices.Sorted(slices.Values(c))
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

// FederationDenyPolicyPrefix starts the name of every RBAC policy denyPeers adds:
// "isthmus-federation/<namespace>/<name>/not-exported-to/<peer mesh>", so a refusal in a
// server's RBAC (config_dump, audit logs) names the service and the peer it is not
// exported to.
const FederationDenyPolicyPrefix = "isthmus-federation/"

// denyPeers returns deny (an inbound RBAC DENY configuration, nil for none) with one
// policy per live peer mesh that service key is not exported to, matching callers whose
// certificate proves that peer's trust domain (the URI SAN spiffe://<td>/…): a peer's
// caller reaches only the services exported to it, whatever it names and through
// whichever gateway listener it came. deny itself is not modified; without peers it is
// returned as it is.
func (e FederationExports) denyPeers(deny *rbacv3.RBAC, key mesh.ServiceKey) *rbacv3.RBAC {
	var out *rbacv3.RBAC
	for _, peer := range slices.Sorted(maps.Keys(e.Peers)) {
		if _, exported := e.Services[key]; exported && slices.Contains(e.Consumers[key], peer) {
			continue
		}
		if out == nil {
			out = &rbacv3.RBAC{Action: rbacv3.RBAC_DENY, Policies: map[string]*rbacv3.Policy{}}
			if deny != nil {
				maps.Copy(out.Policies, deny.Policies)
			}
		}
		td := e.Peers[peer]
		out.Policies[FederationDenyPolicyPrefix+key.Namespace+"/"+key.Name+"/not-exported-to/"+string(peer)] = &rbacv3.Policy{
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
				PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + string(td) + "/"}}}}}},
		}
	}
	if out == nil {
		return deny
	}
	return out
}

// serverSANs returns the matchers a client applies to the server certificate's SANs for
// svc: exactly one of svc.Identities when it lists any (an import: the exporting mesh's
// service accounts), else any SPIFFE ID of svc.TrustDomain when set, else none (local
// services: the chain to the mesh's roots alone).
func serverSANs(svc *MergedService) []*matcherv3.StringMatcher {
	var out []*matcherv3.StringMatcher
	for _, id := range svc.Identities {
		if !id.IsZero() {
			out = append(out, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id.String()}})
		}
	}
	if len(out) == 0 && svc.TrustDomain != "" {
		out = append(out, &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + string(svc.TrustDomain) + "/"}})
	}
	return out
}

// uriSANs types matchers as URI SAN matchers (Envoy's match_typed_subject_alt_names).
func uriSANs(ms []*matcherv3.StringMatcher) []*tlsv3.SubjectAltNameMatcher {
	out := make([]*tlsv3.SubjectAltNameMatcher, 0, len(ms))
	for _, m := range ms {
		out = append(out, &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI, Matcher: m})
	}
	return out
}
