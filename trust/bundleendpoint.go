package trust

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Bundle endpoint profiles, as the SPIFFE federation specification names them.
const (
	// ProfileSPIFFE authenticates the endpoint with an X509-SVID of its trust domain,
	// checked against that domain's bundle (the bootstrap bundle at first) and the
	// endpoint's SPIFFE ID.
	ProfileSPIFFE = "https_spiffe"
	// ProfileWeb authenticates the endpoint with a Web PKI certificate for its host name.
	ProfileWeb = "https_web"
)

// EndpointServiceAccount is the service account named in the SVID a primary's bundle
// endpoint presents under the https_spiffe profile:
// spiffe://<td>/ns/<control-plane namespace>/sa/isthmus-bundle-endpoint.
const EndpointServiceAccount = "isthmus-bundle-endpoint"

// BundleEndpointConfig configures a BundleEndpoint.
type BundleEndpointConfig struct {
	// TrustDomain is the domain whose bundle is served; required.
	TrustDomain mesh.TrustDomain
	// Anchors returns the domain's current roots (the CA's trust anchors: during a root
	// rotation the new root is among them before any leaf is signed under it, so peers
	// learn it ahead of use); required.
	Anchors func() []*x509.Certificate
	// RefreshHint is the spiffe_refresh_hint served: how often peers should fetch again.
	// Default 5 minutes. The SPIFFE rule for rotation is to publish a new root at least
	// 3–5 hints before it signs anything.
	RefreshHint time.Duration
	// Sequence is the spiffe_sequence of the first bundle served; it goes up by one at
	// every change of the anchors. Zero means 1. A primary starts it from the sequence it
	// last stored, so that peers never see it go down across restarts.
	Sequence uint64
	// Metrics registers the endpoint's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

// BundleEndpoint serves one trust domain's SPIFFE bundle (a JWK set with
// spiffe_sequence and spiffe_refresh_hint) as a SPIFFE bundle endpoint. The bundle follows
// the anchors: Refresh (called by Handler on every request, and by whoever wants the
// current bundle) compares them with what is served and bumps the sequence when they
// changed. Serve it over TLS with SPIFFETLSConfig (https_spiffe) or a Web PKI certificate
// (https_web).
type BundleEndpoint struct {
	cfg      BundleEndpointConfig
	served   *prometheus.CounterVec
	sequence prometheus.Gauge

	mu sync.Mutex
	// bundle, raw and key are the bundle served, its JSON, and the fingerprints of its
	// roots; guarded by mu.
	bundle *spiffebundle.Bundle
	raw    []byte
	key    string
	// changed is when the bundle last changed; guarded by mu.
	changed time.Time
}

// NewBundleEndpoint validates cfg and builds the first bundle.
func NewBundleEndpoint(cfg BundleEndpointConfig) (*BundleEndpoint, error) {
	if cfg.Anchors == nil {
		return nil, errors.New("trust: bundle endpoint: Anchors is required")
	}
	if _, err := mesh.ParseTrustDomain(string(cfg.TrustDomain)); err != nil {
		return nil, fmt.Errorf("trust: bundle endpoint: %w", err)
	}
	if cfg.RefreshHint <= 0 {
		cfg.RefreshHint = 5 * time.Minute
	}
	if cfg.Sequence == 0 {
		cfg.Sequence = 1
	}
	if cfg.Metrics == nil {
		cfg.Metrics = prometheus.NewRegistry()
	}
	e := &BundleEndpoint{
		cfg: cfg,
		served: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_trust_bundle_endpoint_requests_total",
			Help: "Requests to the SPIFFE bundle endpoint, by HTTP status code."}, []string{"code"}),
		sequence: prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_trust_bundle_endpoint_sequence",
			Help: "spiffe_sequence of the bundle the endpoint serves."}),
	}
	for _, c := range []prometheus.Collector{e.served, e.sequence} {
		if err := cfg.Metrics.Register(c); err != nil {
			return nil, err
		}
	}
	if _, err := e.refresh(true); err != nil {
		return nil, err
	}
	return e, nil
}

// anchorsKey names a set of roots by their fingerprints, in order.
func anchorsKey(certs []*x509.Certificate) string {
	var b bytes.Buffer
	for _, c := range certs {
		b.WriteString(Fingerprint(c.Raw))
		b.WriteByte(',')
	}
	return b.String()
}

// Refresh rebuilds the bundle when the anchors changed (bumping the sequence) and returns
// the bundle now served.
func (e *BundleEndpoint) Refresh() (*spiffebundle.Bundle, error) { return e.refresh(false) }

func (e *BundleEndpoint) refresh(first bool) (*spiffebundle.Bundle, error) {
	anchors := e.cfg.Anchors()
	key := anchorsKey(anchors)
	e.mu.Lock()
	defer e.mu.Unlock()
	if !first && key == e.key {
		return e.bundle, nil
	}
	if len(anchors) == 0 {
		if e.bundle != nil {
			return e.bundle, nil // never serve an empty bundle: keep the last one
		}
		return nil, fmt.Errorf("trust: bundle endpoint: %s has no roots", e.cfg.TrustDomain)
	}
	td, err := spiffeid.TrustDomainFromString(string(e.cfg.TrustDomain))
	if err != nil {
		return nil, err
	}
	seq := e.cfg.Sequence
	if !first {
		seq = e.sequenceLocked() + 1
	}
	b := spiffebundle.New(td)
	for _, c := range anchors {
		b.AddX509Authority(c)
	}
	b.SetSequenceNumber(seq)
	b.SetRefreshHint(e.cfg.RefreshHint)
	raw, err := b.Marshal()
	if err != nil {
		return nil, fmt.Errorf("trust: bundle endpoint: marshal: %w", err)
	}
	e.bundle, e.raw, e.key, e.changed = b, raw, key, time.Now()
	e.sequence.Set(float64(seq))
	return b, nil
}

func (e *BundleEndpoint) sequenceLocked() uint64 {
	if e.bundle == nil {
		return e.cfg.Sequence
	}
	s, _ := e.bundle.SequenceNumber()
	return s
}

// BundleEndpointStatus is what the endpoint serves (part of /debug/trustz).
type BundleEndpointStatus struct {
	TrustDomain string    `json:"trustDomain"`
	Sequence    uint64    `json:"sequence"`
	RefreshHint string    `json:"refreshHint"`
	Roots       []string  `json:"roots"`
	Changed     time.Time `json:"changed"`
}

// Status reports the bundle served.
func (e *BundleEndpoint) Status() BundleEndpointStatus {
	b, _ := e.Refresh()
	e.mu.Lock()
	defer e.mu.Unlock()
	st := BundleEndpointStatus{TrustDomain: string(e.cfg.TrustDomain), Sequence: e.sequenceLocked(),
		RefreshHint: e.cfg.RefreshHint.String(), Changed: e.changed}
	if b != nil {
		for _, c := range b.X509Authorities() {
			st.Roots = append(st.Roots, Fingerprint(c.Raw))
		}
	}
	return st
}

// ServeHTTP implements http.Handler: GET answers the bundle JSON.
func (e *BundleEndpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	code := http.StatusOK
	defer func() { e.served.WithLabelValues(strconv.Itoa(code)).Inc() }()
	if r.Method != http.MethodGet {
		code = http.StatusMethodNotAllowed
		http.Error(w, "method not allowed: a SPIFFE bundle endpoint answers GET", code)
		return
	}
	if _, err := e.Refresh(); err != nil {
		code = http.StatusServiceUnavailable
		http.Error(w, err.Error(), code)
		return
	}
	e.mu.Lock()
	raw := e.raw
	e.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.Write(raw)
}

// EndpointIdentity is the SPIFFE ID a primary's bundle endpoint presents (https_spiffe).
func EndpointIdentity(td mesh.TrustDomain, namespace string) (mesh.Identity, error) {
	return mesh.NewIdentity(td, namespace, EndpointServiceAccount)
}

// SPIFFETLSConfig is the server TLS configuration of an https_spiffe bundle endpoint: an
// X509-SVID for id from the current authority, issued again at half of its life or when
// the authority changes (a reloaded CA).
func SPIFFETLSConfig(authority func() *Authority, id mesh.Identity) *tls.Config {
	var (
		mu      sync.Mutex
		cert    *tls.Certificate
		issuer  *Authority
		renewAt time.Time
	)
	get := func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
		a := authority()
		mu.Lock()
		defer mu.Unlock()
		if cert != nil && issuer == a && time.Now().Before(renewAt) {
			return cert, nil
		}
		c, err := issueSVID(hello.Context(), a, id, 24*time.Hour)
		if err != nil {
			return nil, err
		}
		cert, issuer = c, a
		renewAt = time.Now().Add(time.Until(c.Leaf.NotAfter) / 2)
		return cert, nil
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: get}
}

// issueSVID mints an X509-SVID for id under a, with the chain up to (not including) the
// root.
func issueSVID(ctx context.Context, a *Authority, id mesh.Identity, ttl time.Duration) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(id.String())
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	chain, err := a.Sign(ctx, csr, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("trust: bundle endpoint SVID: %w", err)
	}
	out := &tls.Certificate{PrivateKey: key}
	for _, p := range chain[:len(chain)-1] {
		certs, err := parseCerts([]byte(p))
		if err != nil {
			return nil, err
		}
		for _, c := range certs {
			out.Certificate = append(out.Certificate, c.Raw)
		}
	}
	out.Leaf, err = x509.ParseCertificate(out.Certificate[0])
	return out, err
}

// CurrentAuthority returns the authority the server signs with now (it changes when the
// plug-in CA is reloaded).
func (s *Server) CurrentAuthority() *Authority { return s.authority() }
