package federation

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Role says which side of a peering this mesh is.
type Role string

// The two sides of a peering.
const (
	// RoleAcceptor made the token.
	RoleAcceptor Role = "acceptor"
	// RoleDialer established with it.
	RoleDialer Role = "dialer"
)

// Peering is one peering as this mesh records it. It is what `isthmus mesh peering
// show` prints, and what the Store persists.
type Peering struct {
	// Name is this mesh's name for the peer (a DNS label).
	Name string `json:"name"`
	// ID is the peering's ID, chosen by the acceptor.
	ID    string `json:"id"`
	Role  Role   `json:"role"`
	State State  `json:"state"`
	// Reason says why the peering is FAILING or TERMINATED, or why its last catalog was
	// refused; empty when all is well.
	Reason string `json:"reason,omitempty"`
	// PeerMesh and PeerTrustDomain are the peer's (empty while PENDING).
	PeerMesh        mesh.MeshID      `json:"peerMesh,omitempty"`
	PeerTrustDomain mesh.TrustDomain `json:"peerTrustDomain,omitempty"`
	// PeerAddresses are the peer's federation endpoints.
	PeerAddresses []string `json:"peerAddresses,omitempty"`
	// PeerGossip are the peer's gossip addresses, to rejoin the pool after a restart.
	PeerGossip []string `json:"peerGossip,omitempty"`
	// PeerRootsPEM is the peer's trust bundle (X.509 roots), exchanged at peering.
	PeerRootsPEM string `json:"peerRootsPEM,omitempty"`
	// SecretHash is SecretHash of the token's secret (acceptor, PENDING only).
	SecretHash string `json:"secretHash,omitempty"`
	// ExpiresAt is the token's expiry (acceptor, PENDING only).
	ExpiresAt time.Time `json:"expiresAt,omitzero"`
	CreatedAt time.Time `json:"createdAt"`
	// LastContact is when a catalog was last received from the peer.
	LastContact time.Time `json:"lastContact,omitzero"`
	// Imported is how many services this mesh imports from the peer now; Exported how
	// many it exports to it.
	Imported int `json:"imported"`
	Exported int `json:"exported"`
	// CatalogSequence is the sequence of the peer's catalog held.
	CatalogSequence uint64 `json:"catalogSequence"`
	// ImportError is the refusal of the peer's last catalog, if any ("never silence").
	ImportError string `json:"importError,omitempty"`
}

// StoredState is everything an Endpoint persists.
type StoredState struct {
	// FederationID and FederationSecret name and key the gossip pool; empty until this
	// mesh creates its first token or establishes a peering.
	FederationID     string    `json:"federationID,omitempty"`
	FederationSecret []byte    `json:"federationSecret,omitempty"`
	Peerings         []Peering `json:"peerings"`
}

// Store persists an Endpoint's state. Save is called with the complete state after every
// change, before the change is acted on; an error leaves the change unmade.
type Store interface {
	Load() (*StoredState, error)
	Save(*StoredState) error
}

// MemoryStore keeps state in memory (tests, or a federation endpoint that may forget its
// peerings on restart).
type MemoryStore struct {
	mu sync.Mutex
	b  []byte // guarded by mu: the last saved state, encoded, so callers never share it
}

// Load returns the saved state, or an empty one.
func (s *MemoryStore) Load() (*StoredState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &StoredState{}
	if s.b == nil {
		return st, nil
	}
	return st, json.Unmarshal(s.b, st)
}

// Save keeps a copy of st.
func (s *MemoryStore) Save(st *StoredState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.b = b
	s.mu.Unlock()
	return nil
}

// FileStore keeps state in a JSON file (mode 0600: it holds the federation secret),
// replaced atomically on every save.
type FileStore struct{ Path string }

// Load reads the file; a missing file is an empty state.
func (s FileStore) Load() (*StoredState, error) {
	st := &StoredState{}
	b, err := os.ReadFile(s.Path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, fmt.Errorf("federation: read state: %w", err)
	}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("federation: state file %s: %w", s.Path, err)
	}
	return st, nil
}

// Save writes the file atomically.
func (s FileStore) Save(st *StoredState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("federation: encode state: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.Path), ".federation-*")
	if err != nil {
		return fmt.Errorf("federation: save state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("federation: save state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("federation: save state: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.Path); err != nil {
		return fmt.Errorf("federation: save state: %w", err)
	}
	return nil
}
