package trust

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// AgentBundleMapFile is the SPIFFE bundle map an agent writes beside its certificate: the
// file grpc-go's file_watcher certificate provider reads as spiffe_trust_bundle_map_file
// (gRFC A87; grpc-go needs GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true). It maps every trusted
// domain to its own bundle, so a peer's chain is verified against its own domain's roots
// only — never a merged pool.
const AgentBundleMapFile = "spiffe-bundle-map.json"

// MarshalBundleMap renders bundles as a SPIFFE bundle map: {"trust_domains": {td: JWKS}}.
func MarshalBundleMap(bundles map[mesh.TrustDomain]*spiffebundle.Bundle) ([]byte, error) {
	m := map[string]json.RawMessage{}
	for _, td := range slices.Sorted(maps.Keys(bundles)) {
		raw, err := bundles[td].Marshal()
		if err != nil {
			return nil, fmt.Errorf("trust: bundle map: %s: %w", td, err)
		}
		m[string(td)] = raw
	}
	return json.MarshalIndent(map[string]any{"trust_domains": m}, "", "  ")
}

// ParseBundleMap reads a SPIFFE bundle map, refusing a malformed one whole.
func ParseBundleMap(data []byte) (map[mesh.TrustDomain]*spiffebundle.Bundle, error) {
	var doc struct {
		TrustDomains map[string]json.RawMessage `json:"trust_domains"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("trust: bundle map: %w", err)
	}
	if doc.TrustDomains == nil {
		return nil, errors.New("trust: bundle map: no trust_domains")
	}
	out := map[mesh.TrustDomain]*spiffebundle.Bundle{}
	for name, raw := range doc.TrustDomains {
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, fmt.Errorf("trust: bundle map: %q: %w", name, err)
		}
		b, err := spiffebundle.Parse(td, raw)
		if err != nil {
			return nil, fmt.Errorf("trust: bundle map: %s: %w", name, err)
		}
		out[mesh.TrustDomain(name)] = b
	}
	return out, nil
}

// BundleMapWriter keeps an agent's view of trust: its own domain's roots as its CA hands
// them out (the CSR response carries the local roots only), and the peer domains' bundles
// from the bundle store (WatchBundleStore into Peers, then Update). It writes the SPIFFE
// bundle map file atomically whenever either changes, and exposes the same bundles as a
// BundleSet for servers that verify peers themselves (BundleSet.VerifyPeer). Aliases are
// written as the target's bundle under the alias's name, so the alias's identities verify
// under the target's roots.
type BundleMapWriter struct {
	// Path is the bundle map file; required.
	Path string
	// Peers is fed by WatchBundleStore; its entry for the agent's own domain, if any, is
	// ignored in favour of the CA's roots. Nil means no peers.
	Peers *BundleSet
	// OnWrite, when set, is called after each write with the file's content.
	OnWrite func([]byte)
	// Into, when set, is kept equal to the bundles in force (e.g. an SDS server's
	// SDSConfig.Bundles; call SDS.RefreshBundles from OnWrite).
	Into *BundleSet

	mu sync.Mutex
	// local, last and set are the CA's roots, the file last written and the bundles in
	// force; guarded by mu.
	local []*x509.Certificate
	td    mesh.TrustDomain
	last  []byte
	set   *BundleSet
}

// SetIssued takes the roots of a newly issued certificate (Agent's OnIssue) as the local
// domain's bundle, the domain read from the leaf's one SPIFFE ID (the CA's response
// carries its own domain's roots only), and returns that identity.
func (w *BundleMapWriter) SetIssued(in Issued) (mesh.Identity, error) {
	if in.Leaf == nil || len(in.Leaf.URIs) != 1 {
		return mesh.Identity{}, errors.New("trust: bundle map: certificate without one SPIFFE ID; bundle map unchanged")
	}
	id, err := mesh.ParseIdentity(in.Leaf.URIs[0].String())
	if err != nil {
		return mesh.Identity{}, fmt.Errorf("trust: bundle map: certificate identity: %w", err)
	}
	return id, w.SetLocal(id.TrustDomain, in.RootPEM)
}

// SetLocal takes the agent's own domain and roots (the root file of an issued
// certificate, PEM) and writes the map.
func (w *BundleMapWriter) SetLocal(td mesh.TrustDomain, rootPEM []byte) error {
	certs, err := parseCerts(rootPEM)
	if err != nil || len(certs) == 0 {
		return fmt.Errorf("trust: bundle map: the CA's roots: no PEM certificate (%v)", err)
	}
	w.mu.Lock()
	w.local, w.td = certs, td
	w.mu.Unlock()
	return w.Update()
}

// Update writes the map if the bundles changed. Call it after Peers changed.
func (w *BundleMapWriter) Update() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.local) == 0 {
		return nil // nothing to write before the first certificate
	}
	std, err := spiffeid.TrustDomainFromString(string(w.td))
	if err != nil {
		return err
	}
	set := NewBundleSet()
	bundles := map[mesh.TrustDomain]*spiffebundle.Bundle{w.td: spiffebundle.FromX509Authorities(std, w.local)}
	if w.Peers != nil {
		for _, td := range w.Peers.Domains() {
			if td != w.td {
				bundles[td], _ = w.Peers.Get(td)
			}
		}
		for alias, target := range w.Peers.Aliases() {
			if b, ok := bundles[target]; ok && alias != w.td {
				sa, err := spiffeid.TrustDomainFromString(string(alias))
				if err != nil {
					continue
				}
				bundles[alias] = spiffebundle.FromX509Authorities(sa, b.X509Authorities())
			}
		}
	}
	for _, b := range bundles {
		if err := set.Set(b); err != nil {
			return err
		}
	}
	data, err := MarshalBundleMap(bundles)
	if err != nil {
		return err
	}
	w.set = set
	if w.Into != nil {
		cp := NewBundleSet() // its own maps: Into is shared with its readers
		for _, b := range bundles {
			cp.Set(b)
		}
		w.Into.replace(cp)
	}
	if bytes.Equal(data, w.last) {
		return nil
	}
	if err := writeAtomic(w.Path, data); err != nil {
		return fmt.Errorf("trust: bundle map: write %s: %w", w.Path, err)
	}
	w.last = data
	if w.OnWrite != nil {
		w.OnWrite(data)
	}
	return nil
}

// Bundles returns the bundles in force (nil before the first certificate).
func (w *BundleMapWriter) Bundles() *BundleSet {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.set
}

// BundleMapPath is the bundle map file in an agent directory.
func BundleMapPath(dir string) string { return filepath.Join(dir, AgentBundleMapFile) }
