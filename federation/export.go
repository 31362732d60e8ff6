package federation

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Export is one local service this mesh exports, with the peers it is exported to (the
// intersection of a ServiceExport in the cluster and the mesh's export policy; see
// ExportPolicy.Consumers).
type Export struct {
	Key       mesh.ServiceKey
	Ports     []CatalogPort
	Consumers []mesh.MeshID
	// Identities are the service accounts its endpoints run as, in this mesh's trust
	// domain, sorted; importers' clients require the server to prove one of them.
	Identities []mesh.Identity
}

// ExportSource is where an Endpoint reads what it exports. Exports returns the complete
// current set; Changed receives a value after it may have changed (coalesced).
type ExportSource interface {
	Exports() []Export
	Changed() <-chan struct{}
}

// ImportedService is one service imported from a peer, ready for the importing mesh's
// registry.
type ImportedService struct {
	// Hostname is ImportHostname(Peer, Key).
	Hostname mesh.Hostname
	// Key is the service's namespace and name in the exporting mesh.
	Key mesh.ServiceKey
	// Peer and TrustDomain are the exporting mesh's.
	Peer        mesh.MeshID
	TrustDomain mesh.TrustDomain
	Ports       []CatalogPort
	// Gateways are the exporting mesh's east-west gateways for it.
	Gateways []netip.AddrPort
	// Identities are the server identities a client must see (the exporter's service
	// accounts, all in TrustDomain); empty means any identity of TrustDomain.
	Identities []mesh.Identity
}

// ImportSink receives imports. ReplaceImports sets the complete set imported from peer
// at once (never a part of it); an empty set withdraws them all.
type ImportSink interface {
	ReplaceImports(peer mesh.MeshID, services []ImportedService)
}

// ExportRule exports the namespaces it lists to one peer mesh (namespace tenancy).
type ExportRule struct {
	Peer       mesh.MeshID `json:"peer"`
	Namespaces []string    `json:"namespaces"`
}

// ExportPolicy is the mesh-level export policy: a service leaves the mesh only if a rule
// names the peer and the service's namespace. The zero policy exports nothing.
type ExportPolicy struct {
	Rules []ExportRule `json:"rules"`
}

// Validate checks every rule.
func (p ExportPolicy) Validate() error {
	for i, r := range p.Rules {
		if _, err := mesh.ParseMeshID(string(r.Peer)); err != nil {
			return fmt.Errorf("federation: export rule %d: %w", i, err)
		}
		if len(r.Namespaces) == 0 {
			return fmt.Errorf("federation: export rule %d (peer %s): no namespaces", i, r.Peer)
		}
		for _, ns := range r.Namespaces {
			if _, err := mesh.NewServiceKey(ns, "x"); err != nil {
				return fmt.Errorf("federation: export rule %d (peer %s): %w", i, r.Peer, err)
			}
		}
	}
	return nil
}

// Consumers returns the peers the policy exports namespace ns to, sorted.
func (p ExportPolicy) Consumers(ns string) []mesh.MeshID {
	var out []mesh.MeshID
	for _, r := range p.Rules {
		if slices.Contains(r.Namespaces, ns) && !slices.Contains(out, r.Peer) {
			out = append(out, r.Peer)
		}
	}
	slices.Sort(out)
	return out
}

// StaticExports is an ExportSource whose set is replaced with Set: tests, and the
// mesh-level policy applied to a fixed list.
type StaticExports struct {
	ch chan struct{}
	v  chan []Export // holds the current set; one slot, so Set and Exports never race
}

// NewStaticExports returns a source exporting initial.
func NewStaticExports(initial []Export) *StaticExports {
	s := &StaticExports{ch: make(chan struct{}, 1), v: make(chan []Export, 1)}
	s.v <- slices.Clone(initial)
	return s
}

// Exports returns the current set.
func (s *StaticExports) Exports() []Export {
	e := <-s.v
	s.v <- e
	return slices.Clone(e)
}

// Changed implements ExportSource.
func (s *StaticExports) Changed() <-chan struct{} { return s.ch }

// Set replaces the set and signals a change.
func (s *StaticExports) Set(e []Export) {
	<-s.v
	s.v <- slices.Clone(e)
	select {
	case s.ch <- struct{}{}:
	default:
	}
}

// catalogFor builds the catalog of what self exports to peer.
func catalogFor(self mesh.MeshID, td mesh.TrustDomain, peer mesh.MeshID, seq uint64, exports []Export, gateways []string) *Catalog {
	c := &Catalog{Mesh: self, TrustDomain: td, Sequence: seq, Services: []ExportedService{}}
	for _, e := range exports {
		if !slices.Contains(e.Consumers, peer) {
			continue
		}
		c.Services = append(c.Services, ExportedService{Namespace: e.Key.Namespace, Name: e.Key.Name,
			Ports: slices.Clone(e.Ports), Gateways: slices.Clone(gateways), Consumers: []mesh.MeshID{peer},
			Identities: identityStrings(e.Identities)})
	}
	slices.SortFunc(c.Services, func(a, b ExportedService) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return c
}

// importsOf turns an accepted catalog into imports.
func importsOf(c *Catalog) []ImportedService {
	out := make([]ImportedService, 0, len(c.Services))
	for _, s := range c.Services {
		key := mesh.ServiceKey{Namespace: s.Namespace, Name: s.Name}
		is := ImportedService{Hostname: ImportHostname(c.Mesh, key), Key: key, Peer: c.Mesh, TrustDomain: c.TrustDomain, Ports: slices.Clone(s.Ports)}
		for _, g := range s.Gateways {
			is.Gateways = append(is.Gateways, netip.MustParseAddrPort(g)) // Validate parsed each
		}
		for _, id := range s.Identities {
			v, _ := mesh.ParseIdentity(id) // Validate parsed each
			is.Identities = append(is.Identities, v)
		}
		out = append(out, is)
	}
	return out
}

// identityStrings returns the SPIFFE IDs of ids, sorted and without duplicates; nil for none.
func identityStrings(ids []mesh.Identity) []string {
	var out []string
	for _, id := range ids {
		if !id.IsZero() {
			out = append(out, id.String())
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
