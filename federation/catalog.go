package federation

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Limits on one catalog, so a peer cannot make us hold or rebuild without bound.
const (
	maxCatalogBytes    = 4 << 20
	maxCatalogServices = 4096
	maxServicePorts    = 64
	maxServiceGateways = 16
	// maxServiceIdentities bounds the service accounts one entry may list.
	maxServiceIdentities = 64
)

// ImportHostname is the name an importing mesh gives service key of peer mesh peer
// (mesh.ServiceKey.FederatedHostname: <name>.<namespace>.svc.<peer>.isthmus).
func ImportHostname(peer mesh.MeshID, key mesh.ServiceKey) mesh.Hostname {
	return key.FederatedHostname(peer)
}

// Catalog is everything one mesh exports to one peer, sent whole on every change.
type Catalog struct {
	// Mesh and TrustDomain are the exporter's.
	Mesh        mesh.MeshID      `json:"mesh"`
	TrustDomain mesh.TrustDomain `json:"trustDomain"`
	// Sequence grows with every catalog the exporter sends this peer; a receiver refuses
	// one older than what it holds.
	Sequence uint64 `json:"sequence"`
	// Services are the exported services, sorted by namespace and name.
	Services []ExportedService `json:"services"`
}

// ExportedService is one service in a catalog.
type ExportedService struct {
	Namespace string        `json:"namespace"`
	Name      string        `json:"name"`
	Ports     []CatalogPort `json:"ports"`
	// Gateways are the exporting mesh's east-west gateways for this service
	// (IP:port literals): an importer routes to them, mTLS end to end.
	Gateways []string `json:"gateways"`
	// Consumers are the peer meshes this service is exported to; a receiver must be one.
	Consumers []mesh.MeshID `json:"consumers"`
	// Identities are the SPIFFE IDs (spiffe://<exporter's td>/ns/<ns>/sa/<sa>) the
	// service's endpoints run as, sorted: an importer's clients accept only a server
	// proving one of them. Empty when the exporter knows no endpoint; the importer then
	// requires the exporter's trust domain alone.
	Identities []string `json:"identities,omitempty"`
}

// CatalogPort is one port of an exported service.
type CatalogPort struct {
	Name     string        `json:"name"`
	Port     uint16        `json:"port"`
	Protocol mesh.Protocol `json:"protocol,omitempty"`
}

// Reasons a received catalog is refused; they label isthmus_federation_catalog_refused_total.
const (
	ReasonMesh        = "mesh"
	ReasonTrustDomain = "trust_domain"
	ReasonNotExported = "not_exported"
	ReasonInvalid     = "invalid"
	ReasonStale       = "stale"
)

// CatalogError is a refused catalog: Reason is one of the Reason constants.
type CatalogError struct {
	Reason string
	Err    error
}

func (e *CatalogError) Error() string {
	return "federation: catalog refused (" + e.Reason + "): " + e.Err.Error()
}

// Unwrap returns the cause.
func (e *CatalogError) Unwrap() error { return e.Err }

func refuse(reason, format string, args ...any) error {
	return &CatalogError{Reason: reason, Err: fmt.Errorf(format, args...)}
}

// RefusalReason returns the reason of a CatalogError in err's chain, or ReasonInvalid.
func RefusalReason(err error) string {
	var ce *CatalogError
	if errors.As(err, &ce) {
		return ce.Reason
	}
	return ReasonInvalid
}

// DecodeCatalog parses a catalog strictly (unknown fields, trailing data and oversize
// input refused) and checks it on its own (Validate). Errors are CatalogErrors.
func DecodeCatalog(b []byte) (*Catalog, error) {
	if len(b) > maxCatalogBytes {
		return nil, refuse(ReasonInvalid, "%d bytes, more than %d", len(b), maxCatalogBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var c Catalog
	if err := dec.Decode(&c); err != nil {
		return nil, refuse(ReasonInvalid, "decode: %w", err)
	}
	if dec.More() {
		return nil, refuse(ReasonInvalid, "data after the catalog")
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Validate checks the catalog on its own: names, ports, protocols, gateway addresses,
// consumers, no duplicates, within the limits. Errors are CatalogErrors (ReasonInvalid).
func (c *Catalog) Validate() error {
	if _, err := mesh.ParseMeshID(string(c.Mesh)); err != nil {
		return refuse(ReasonInvalid, "mesh: %w", err)
	}
	if _, err := mesh.ParseTrustDomain(string(c.TrustDomain)); err != nil {
		return refuse(ReasonInvalid, "trust domain: %w", err)
	}
	if len(c.Services) > maxCatalogServices {
		return refuse(ReasonInvalid, "%d services, more than %d", len(c.Services), maxCatalogServices)
	}
	seen := map[mesh.ServiceKey]bool{}
	for i := range c.Services {
		s := &c.Services[i]
		key, err := mesh.NewServiceKey(s.Namespace, s.Name)
		if err != nil {
			return refuse(ReasonInvalid, "service %d: %w", i, err)
		}
		if seen[key] {
			return refuse(ReasonInvalid, "service %s listed twice", key)
		}
		seen[key] = true
		if err := s.validate(); err != nil {
			return refuse(ReasonInvalid, "service %s: %w", key, err)
		}
	}
	return nil
}

func (s *ExportedService) validate() error {
	if len(s.Ports) == 0 || len(s.Ports) > maxServicePorts {
		return fmt.Errorf("%d ports, want 1 to %d", len(s.Ports), maxServicePorts)
	}
	names := map[string]bool{}
	for _, p := range s.Ports {
		if p.Port == 0 {
			return fmt.Errorf("port %q has number 0", p.Name)
		}
		if names[p.Name] {
			return fmt.Errorf("port name %q twice", p.Name)
		}
		names[p.Name] = true
		switch p.Protocol {
		case mesh.ProtocolUnknown, mesh.ProtocolTCP, mesh.ProtocolHTTP, mesh.ProtocolHTTP2, mesh.ProtocolGRPC, mesh.ProtocolTLS:
		default:
			return fmt.Errorf("port %q: unknown protocol %q", p.Name, p.Protocol)
		}
	}
	if len(s.Gateways) == 0 || len(s.Gateways) > maxServiceGateways {
		return fmt.Errorf("%d gateways, want 1 to %d", len(s.Gateways), maxServiceGateways)
	}
	for _, g := range s.Gateways {
		ap, err := netip.ParseAddrPort(g)
		if err != nil || ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() || ap.Addr().IsMulticast() {
			return fmt.Errorf("gateway %q: want a unicast IP:port", g)
		}
	}
	if len(s.Consumers) == 0 {
		return errors.New("no consumers")
	}
	for _, m := range s.Consumers {
		if _, err := mesh.ParseMeshID(string(m)); err != nil {
			return fmt.Errorf("consumer: %w", err)
		}
	}
	if len(s.Identities) > maxServiceIdentities {
		return fmt.Errorf("%d identities, more than %d", len(s.Identities), maxServiceIdentities)
	}
	ids := map[string]bool{}
	for _, id := range s.Identities {
		v, err := mesh.ParseIdentity(id)
		if err != nil {
			return fmt.Errorf("identity: %w", err)
		}
		if v.String() != id {
			return fmt.Errorf("identity %q is not in canonical form %q", id, v.String())
		}
		if ids[id] {
			return fmt.Errorf("identity %s twice", id)
		}
		ids[id] = true
	}
	return nil
}

// PeerClaim is what an importer knows of a peer before reading its catalog: the mesh and
// trust domain it peered with, and the trust domain the catalog stream's certificate
// proved.
type PeerClaim struct {
	Mesh        mesh.MeshID
	TrustDomain mesh.TrustDomain
	// Proved is the trust domain of the stream's peer certificate.
	Proved mesh.TrustDomain
}

// CheckReceived judges a decoded, valid catalog from a peer as the importer self. The
// whole catalog is refused (err, a CatalogError) unless it is the peer's own (mesh and
// trust domain, and the stream proved that domain) and its sequence is not older than
// last (the sequence of the catalog held; 0 when none). An entry naming a service the
// peer does not export to self (ReasonNotExported), or listing a service identity outside
// the peer's trust domain (ReasonIdentity), is refused alone: apply is the catalog without
// such entries and refused holds one CatalogError per entry left out, so a peer's mistake
// about one service never takes the others away. c is not modified.
func CheckReceived(c *Catalog, peer PeerClaim, self mesh.MeshID, last uint64) (apply *Catalog, refused []error, err error) {
	if c.Mesh != peer.Mesh {
		return nil, nil, refuse(ReasonMesh, "peer %s sent a catalog of mesh %s", peer.Mesh, c.Mesh)
	}
	if c.TrustDomain != peer.TrustDomain {
		return nil, nil, refuse(ReasonTrustDomain, "peer %s (trust domain %s) sent a catalog claiming trust domain %s", peer.Mesh, peer.TrustDomain, c.TrustDomain)
	}
	if peer.Proved != peer.TrustDomain {
		return nil, nil, refuse(ReasonTrustDomain, "peer %s's stream proved trust domain %q, want %s", peer.Mesh, peer.Proved, peer.TrustDomain)
	}
	if c.Sequence < last {
		return nil, nil, refuse(ReasonStale, "sequence %d is older than the held %d", c.Sequence, last)
	}
	out := *c
	out.Services = make([]ExportedService, 0, len(c.Services))
	for _, s := range c.Services {
		if !slices.Contains(s.Consumers, self) {
			refused = append(refused, refuse(ReasonNotExported, "peer %s names %s/%s, which it does not export to %s (consumers %v)", peer.Mesh, s.Namespace, s.Name, self, s.Consumers))
			continue
		}
		if id := foreignIdentity(s.Identities, peer.TrustDomain); id != "" {
			refused = append(refused, refuse(ReasonIdentity, "peer %s lists identity %s for %s/%s, outside its trust domain %s", peer.Mesh, id, s.Namespace, s.Name, peer.TrustDomain))
			continue
		}
		out.Services = append(out.Services, s)
	}
	return &out, refused, nil
}

// foreignIdentity returns the first of ids (valid SPIFFE IDs) not in trust domain td, or "".
func foreignIdentity(ids []string, td mesh.TrustDomain) string {
	for _, id := range ids {
		v, err := mesh.ParseIdentity(id)
		if err != nil || v.TrustDomain != td {
			return id
		}
	}
	return ""
}
