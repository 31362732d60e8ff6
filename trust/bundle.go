package trust

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// BundleSet holds the trust bundles (root certificates) of several trust domains, keyed by
// domain and never merged: the roots of one domain vouch only for identities of that
// domain. It is safe for concurrent use and satisfies go-spiffe's x509bundle.Source.
type BundleSet struct {
	// mu guards bundles and aliases together, so that the invariant "no domain is both a
	// bundle and an alias" holds at every read. The bundles themselves are go-spiffe's,
	// safe for concurrent use, and are read outside the lock.
	mu sync.RWMutex
	// bundles holds one bundle per trust domain, never merged.
	bundles map[mesh.TrustDomain]*spiffebundle.Bundle
	// aliases maps a trust domain to the domain whose bundle verifies its identities
	// (a domain being renamed: the old name stays valid under the new domain's roots).
	// A target is not required to have a bundle at every moment: an alias whose target
	// was removed verifies nothing.
	aliases map[mesh.TrustDomain]mesh.TrustDomain
}

// NewBundleSet returns an empty set.
func NewBundleSet() *BundleSet {
	return &BundleSet{bundles: map[mesh.TrustDomain]*spiffebundle.Bundle{}, aliases: map[mesh.TrustDomain]mesh.TrustDomain{}}
}

// SetAlias makes identities of alias verify against target's bundle. An alias never
// shadows a domain that has a bundle of its own.
func (s *BundleSet) SetAlias(alias, target mesh.TrustDomain) error {
	if alias == target {
		return fmt.Errorf("trust: alias %s names itself", alias)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.bundles[alias]; ok {
		return fmt.Errorf("trust: %s has a bundle of its own; remove it before making it an alias", alias)
	}
	s.aliases[alias] = target
	return nil
}

// RemoveAlias drops an alias.
func (s *BundleSet) RemoveAlias(alias mesh.TrustDomain) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.aliases, alias)
}

// Aliases returns a copy of the aliases (alias → target).
func (s *BundleSet) Aliases() map[mesh.TrustDomain]mesh.TrustDomain {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[mesh.TrustDomain]mesh.TrustDomain, len(s.aliases))
	for a, t := range s.aliases {
		out[a] = t
	}
	return out
}

// verifierFor returns the bundle that verifies identities of td: its own, or its alias
// target's.
func (s *BundleSet) verifierFor(td mesh.TrustDomain) (*spiffebundle.Bundle, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if b, ok := s.bundles[td]; ok {
		return b, true
	}
	if t, ok := s.aliases[td]; ok {
		b, ok := s.bundles[t]
		return b, ok
	}
	return nil, false
}

// LocalBundle returns a's trust domain's bundle: its root, with the given sequence number
// and refresh hint (how often peers should fetch it).
func LocalBundle(a *Authority, sequence uint64, refreshHint time.Duration) (*spiffebundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(string(a.TrustDomain))
	if err != nil {
		return nil, fmt.Errorf("trust: bundle: %w", err)
	}
	b := spiffebundle.New(td)
	b.AddX509Authority(a.Root)
	b.SetSequenceNumber(sequence)
	b.SetRefreshHint(refreshHint)
	return b, nil
}

// Set stores (or replaces) the bundle of its trust domain.
func (s *BundleSet) Set(b *spiffebundle.Bundle) error {
	td, err := mesh.ParseTrustDomain(b.TrustDomain().Name())
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.aliases[td]; ok {
		return fmt.Errorf("trust: %s is an alias; remove the alias before adding its own bundle", td)
	}
	s.bundles[td] = b
	return nil
}

// Remove drops a trust domain's bundle: its identities stop verifying.
func (s *BundleSet) Remove(td mesh.TrustDomain) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.bundles, td)
}

// Get returns the bundle of td.
func (s *BundleSet) Get(td mesh.TrustDomain) (*spiffebundle.Bundle, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	b, ok := s.bundles[td]
	return b, ok
}

// Domains lists the trust domains held, sorted.
func (s *BundleSet) Domains() []mesh.TrustDomain {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]mesh.TrustDomain, 0, len(s.bundles))
	for td := range s.bundles {
		out = append(out, td)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// GetX509BundleForTrustDomain implements go-spiffe's x509bundle.Source.
// Aliases are followed: an alias's identities verify against its target's roots.
func (s *BundleSet) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, ok := s.verifierFor(mesh.TrustDomain(td.Name()))
	if !ok {
		return nil, fmt.Errorf("trust: no bundle for trust domain %q", td.Name())
	}
	return b.X509Bundle(), nil
}

// GetBundleForTrustDomain implements go-spiffe's spiffebundle.Source.
func (s *BundleSet) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	b, ok := s.Get(mesh.TrustDomain(td.Name()))
	if !ok {
		return nil, fmt.Errorf("trust: no bundle for trust domain %q", td.Name())
	}
	return b, nil
}

// ErrNoBundle is returned by VerifyPeer when the peer's trust domain has no bundle.
var ErrNoBundle = errors.New("trust: no bundle for the peer's trust domain")

// VerifyPeer verifies a TLS peer's certificate chain (as crypto/tls hands it to
// VerifyPeerCertificate) against the bundle of the leaf's own trust domain only, and
// returns the peer's identity. The leaf must carry exactly one URI SAN, a SPIFFE ID; the
// domain is read from it before any verification, so a root of one domain is never even
// tried for another's identity. Any extended key usage is accepted: the same leaves are
// both clients and servers.
func (s *BundleSet) VerifyPeer(rawCerts [][]byte) (mesh.Identity, error) {
	if len(rawCerts) == 0 {
		return mesh.Identity{}, errors.New("trust: peer sent no certificate")
	}
	certs := make([]*x509.Certificate, len(rawCerts))
	for i, r := range rawCerts {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return mesh.Identity{}, fmt.Errorf("trust: peer certificate %d: %w", i, err)
		}
		certs[i] = c
	}
	leaf := certs[0]
	if len(leaf.URIs) != 1 {
		return mesh.Identity{}, fmt.Errorf("trust: peer certificate has %d URI SANs; want one SPIFFE ID", len(leaf.URIs))
	}
	id, err := mesh.ParseIdentity(leaf.URIs[0].String())
	if err != nil {
		return mesh.Identity{}, err
	}
	b, ok := s.verifierFor(id.TrustDomain)
	if !ok {
		return mesh.Identity{}, fmt.Errorf("%w %s (peer %s)", ErrNoBundle, id.TrustDomain, id)
	}
	roots := x509.NewCertPool()
	for _, r := range b.X509Authorities() {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return mesh.Identity{}, fmt.Errorf("trust: peer %s: %w", id, err)
	}
	return id, nil
}

// BundleHandler serves one trust domain's bundle from set as a SPIFFE bundle endpoint
// (the SPIFFE bundle JSON: a JWK set with spiffe_sequence and spiffe_refresh_hint). Serve
// it over TLS with a Web PKI certificate (https_web profile) or with an SVID of the trust
// domain (https_spiffe profile); the handler is the same.
func BundleHandler(set *BundleSet, td mesh.TrustDomain) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		b, ok := set.Get(td)
		if !ok {
			http.Error(w, "no bundle for "+string(td), http.StatusNotFound)
			return
		}
		data, err := b.Marshal()
		if err != nil {
			http.Error(w, "marshal bundle: "+err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(data)
	})
}

// FetchOptions says how to authenticate a peer's bundle endpoint: exactly one of WebRoots
// (https_web) or EndpointID with Bundles (https_spiffe).
type FetchOptions struct {
	// WebRoots are the CAs of the endpoint's Web PKI certificate (https_web). Nil is not
	// "the system's roots": pass x509.SystemCertPool() for that (ReadBundle does when
	// it is given no endpoint CA).
	WebRoots *x509.CertPool
	// EndpointID is the SPIFFE ID the endpoint's SVID must carry (https_spiffe).
	EndpointID mesh.Identity
	// Bundles verify that SVID: they must already hold the peer domain's bundle, from an
	// earlier fetch or out of band (the profile's bootstrap).
	Bundles *BundleSet
}

// federation maps o to go-spiffe's fetch options, refusing a mix of the two profiles.
func (o FetchOptions) federation() ([]federation.FetchOption, error) {
	switch {
	case o.WebRoots != nil && o.EndpointID.IsZero():
		return []federation.FetchOption{federation.WithWebPKIRoots(o.WebRoots)}, nil
	case o.WebRoots == nil && !o.EndpointID.IsZero() && o.Bundles != nil:
		id, err := spiffeid.FromString(o.EndpointID.String())
		if err != nil {
			return nil, err
		}
		return []federation.FetchOption{federation.WithSPIFFEAuth(o.Bundles, id)}, nil
	}
	return nil, errors.New("trust: fetch options: give WebRoots (https_web) or EndpointID and Bundles (https_spiffe)")
}

// FetchBundle fetches a peer trust domain's bundle from its bundle endpoint.
func FetchBundle(ctx context.Context, td mesh.TrustDomain, url string, o FetchOptions) (*spiffebundle.Bundle, error) {
	opts, err := o.federation()
	if err != nil {
		return nil, err
	}
	std, err := spiffeid.TrustDomainFromString(string(td))
	if err != nil {
		return nil, err
	}
	b, err := federation.FetchBundle(ctx, std, url, opts...)
	if err != nil {
		return nil, fmt.Errorf("trust: fetch bundle of %s from %s: %w", td, url, err)
	}
	return b, nil
}

// WatchBundle keeps a peer's bundle in set current until ctx ends, fetching again as the
// bundle's refresh hint asks (go-spiffe's WatchBundle). onError sees each failed fetch;
// the last good bundle stays in the set meanwhile.
func WatchBundle(ctx context.Context, set *BundleSet, td mesh.TrustDomain, url string, o FetchOptions, onError func(error)) error {
	opts, err := o.federation()
	if err != nil {
		return err
	}
	std, err := spiffeid.TrustDomainFromString(string(td))
	if err != nil {
		return err
	}
	return federation.WatchBundle(ctx, std, url, bundleWatcher{set: set, onError: onError}, opts...)
}

// bundleWatcher is go-spiffe's federation.BundleWatcher over a BundleSet.
type bundleWatcher struct {
	set     *BundleSet
	onError func(error)
}

// NextRefresh follows the bundle's refresh hint; a bundle without one is fetched again
// every five minutes.
func (w bundleWatcher) NextRefresh(hint time.Duration) time.Duration {
	if hint <= 0 {
		return 5 * time.Minute
	}
	return hint
}

// OnUpdate stores a fetched bundle. Set fails only when the domain has meanwhile become an
// alias here; the alias wins and the fetched bundle is dropped.
func (w bundleWatcher) OnUpdate(b *spiffebundle.Bundle) { _ = w.set.Set(b) }

// OnError reports a failed fetch; the last good bundle stays in the set.
func (w bundleWatcher) OnError(err error) {
	if w.onError != nil {
		w.onError(err)
	}
}
