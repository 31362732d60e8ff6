package trust

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Reasons a peer bundle fetch is refused: the values of PeerStatus.LastErrorReason and of
// the result label of isthmus_trust_federation_fetches_total.
const (
	ReasonOK               = "ok"
	ReasonTimeout          = "timeout"            // no answer within the fetch timeout
	ReasonUnreachable      = "unreachable"        // no connection (refused, no route, DNS)
	ReasonTLS              = "tls"                // the endpoint's certificate does not verify
	ReasonEndpointID       = "endpoint_id"        // https_spiffe: the endpoint presented another SPIFFE ID
	ReasonHTTPStatus       = "http_status"        // an answer other than 200
	ReasonMalformed        = "malformed"          // not a SPIFFE bundle, or no usable X.509 root
	ReasonWrongTrustDomain = "wrong_trust_domain" // a root that names another trust domain
	ReasonLowerSequence    = "lower_sequence"     // spiffe_sequence lower than the bundle in force
)

// maxBundleSize bounds a bundle endpoint's answer; real bundles are a few KiB.
const maxBundleSize = 1 << 20

// PeerStatus is what a federation knows of one peer (/debug/trustz, `isthmus trust
// status`).
type PeerStatus struct {
	TrustDomain string `json:"trustDomain"`
	EndpointURL string `json:"endpointURL"`
	Profile     string `json:"profile"`
	// State is "ok" (the last fetch was accepted), "failing" (it was refused; the bundle
	// in force stays) or "bootstrap" (no fetch accepted yet; the bootstrap bundle, if
	// any, is in force).
	State string `json:"state"`
	// Sequence is the spiffe_sequence of the bundle in force; Roots its roots.
	Sequence uint64   `json:"sequence"`
	Roots    []string `json:"roots,omitempty"`
	// RefreshHint is the peer's spiffe_refresh_hint, honoured within the federation's
	// bounds.
	RefreshHint string    `json:"refreshHint,omitempty"`
	LastSuccess time.Time `json:"lastSuccess,omitzero"`
	LastAttempt time.Time `json:"lastAttempt,omitzero"`
	NextRefresh time.Time `json:"nextRefresh,omitzero"`
	// Age is how long ago the bundle in force was last confirmed by a fetch.
	Age string `json:"age,omitempty"`
	// LastError and LastErrorReason describe the last refused fetch; they stay after a
	// later success so a flapping peer is visible (LastErrorAt says when).
	LastError       string    `json:"lastError,omitempty"`
	LastErrorReason string    `json:"lastErrorReason,omitempty"`
	LastErrorAt     time.Time `json:"lastErrorAt,omitzero"`
	// Failures counts consecutive refused fetches.
	Failures int `json:"failures"`
	// Stored says the bundle in force is the one the federation last wrote to the bundle
	// store (agents read the store, so until then they trust the previous bundle).
	Stored bool `json:"stored"`
}

// peerWatcher fetches one peer's bundle as its refresh hint asks, keeping the last good
// bundle when a fetch is refused.
type peerWatcher struct {
	rel        Relationship
	td         mesh.TrustDomain
	timeout    time.Duration
	minRefresh time.Duration
	maxRefresh time.Duration
	onResult   func(reason string)
	onAccept   func(*spiffebundle.Bundle)

	mu sync.Mutex
	// inForce is the last good bundle (the bootstrap bundle before the first fetch);
	// status is what is reported; both guarded by mu.
	inForce *spiffebundle.Bundle
	status  PeerStatus
	// poke wakes the watcher for an immediate fetch.
	poke chan struct{}
}

func newPeerWatcher(rel Relationship, timeout, minRefresh, maxRefresh time.Duration, onResult func(string), onAccept func(*spiffebundle.Bundle)) (*peerWatcher, error) {
	if err := rel.Validate(); err != nil {
		return nil, err
	}
	w := &peerWatcher{rel: rel, td: mesh.TrustDomain(rel.TrustDomain), timeout: timeout, minRefresh: minRefresh, maxRefresh: maxRefresh,
		onResult: onResult, onAccept: onAccept, poke: make(chan struct{}, 1),
		status: PeerStatus{TrustDomain: rel.TrustDomain, EndpointURL: rel.EndpointURL, Profile: rel.Profile, State: "bootstrap"}}
	if rel.BootstrapBundle != "" {
		b, err := ParsePeerBundle(w.td, []byte(rel.BootstrapBundle))
		if err != nil {
			return nil, err
		}
		w.inForce = b
		w.describeLocked(b)
	}
	return w, nil
}

// Status returns the peer's status now.
func (w *peerWatcher) Status() PeerStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	st := w.status
	st.Roots = append([]string(nil), st.Roots...)
	if !st.LastSuccess.IsZero() {
		st.Age = time.Since(st.LastSuccess).Round(time.Second).String()
	}
	return st
}

// InForce returns the bundle in force, or nil.
func (w *peerWatcher) InForce() *spiffebundle.Bundle {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.inForce
}

func (w *peerWatcher) describeLocked(b *spiffebundle.Bundle) {
	w.status.Roots = nil
	for _, c := range b.X509Authorities() {
		w.status.Roots = append(w.status.Roots, Fingerprint(c.Raw))
	}
	w.status.Sequence, _ = b.SequenceNumber()
	if h, ok := b.RefreshHint(); ok {
		w.status.RefreshHint = h.String()
	}
}

// Run fetches until ctx ends.
func (w *peerWatcher) Run(ctx context.Context) error {
	backoff := time.Second
	for {
		next := w.fetchOnce(ctx)
		if w.Status().State == "ok" {
			backoff = time.Second
		} else {
			// A refused fetch is retried sooner than the hint, backing off up to it.
			next = min(next, backoff)
			backoff = min(2*backoff, w.maxRefresh)
		}
		w.mu.Lock()
		w.status.NextRefresh = time.Now().Add(next)
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-w.poke:
		case <-time.After(next):
		}
	}
}

// Refresh asks for a fetch now.
func (w *peerWatcher) Refresh() {
	select {
	case w.poke <- struct{}{}:
	default:
	}
}

// fetchOnce fetches and checks the bundle, and returns when to fetch next.
func (w *peerWatcher) fetchOnce(ctx context.Context) time.Duration {
	b, reason, err := w.fetch(ctx)
	now := time.Now()
	w.mu.Lock()
	w.status.LastAttempt = now
	if err != nil {
		w.status.Failures++
		w.status.LastError, w.status.LastErrorReason, w.status.LastErrorAt = err.Error(), reason, now
		if w.status.State == "ok" {
			w.status.State = "failing"
		} else if w.status.State != "failing" && !w.status.LastSuccess.IsZero() {
			w.status.State = "failing"
		}
	} else {
		w.inForce = b
		w.status.State, w.status.Failures, w.status.LastSuccess = "ok", 0, now
		w.describeLocked(b)
	}
	hint := time.Duration(0)
	if w.inForce != nil {
		hint, _ = w.inForce.RefreshHint()
	}
	w.mu.Unlock()
	w.onResult(reason)
	if err == nil {
		w.onAccept(b)
	}
	if hint <= 0 {
		hint = 5 * time.Minute
	}
	return min(max(hint, w.minRefresh), w.maxRefresh)
}

// fetch GETs the peer's bundle, authenticating the endpoint as its profile says, and
// checks it: a refusal comes with its reason.
func (w *peerWatcher) fetch(ctx context.Context) (*spiffebundle.Bundle, string, error) {
	tc, err := w.tlsConfig()
	if err != nil {
		return nil, ReasonTLS, err
	}
	ctx, cancel := context.WithTimeout(ctx, w.timeout)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: tc, Proxy: nil, DisableKeepAlives: true, TLSHandshakeTimeout: w.timeout}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.rel.EndpointURL, http.NoBody)
	if err != nil {
		return nil, ReasonUnreachable, fmt.Errorf("trust: federation %s: request: %w", w.td, err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		reason := classifyFetchError(ctx, err)
		if reason == ReasonEndpointID {
			return nil, reason, fmt.Errorf("trust: federation %s: GET %s: %w (the relationship expects %s)", w.td, w.rel.EndpointURL, err, w.rel.EndpointSPIFFEID)
		}
		return nil, reason, fmt.Errorf("trust: federation %s: GET %s: %w", w.td, w.rel.EndpointURL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, ReasonHTTPStatus, fmt.Errorf("trust: federation %s: GET %s: %s", w.td, w.rel.EndpointURL, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBundleSize+1))
	if err != nil {
		return nil, classifyFetchError(ctx, err), fmt.Errorf("trust: federation %s: read answer: %w", w.td, err)
	}
	if len(data) > maxBundleSize {
		return nil, ReasonMalformed, fmt.Errorf("trust: federation %s: %w: answer larger than %d bytes", w.td, ErrMalformedBundle, maxBundleSize)
	}
	b, err := ParsePeerBundle(w.td, data)
	if err != nil {
		reason := ReasonMalformed
		if errors.Is(err, ErrWrongTrustDomain) {
			reason = ReasonWrongTrustDomain
		}
		return nil, reason, fmt.Errorf("trust: federation %s: %w", w.td, err)
	}
	if cur := w.InForce(); cur != nil {
		old, okOld := cur.SequenceNumber()
		seq, okNew := b.SequenceNumber()
		if okOld && (!okNew || seq < old) {
			return nil, ReasonLowerSequence, fmt.Errorf("trust: federation %s: %w: %d after %d (a stale or replayed bundle)", w.td, ErrLowerSequence, seq, old)
		}
	}
	return b, ReasonOK, nil
}

// tlsConfig authenticates the endpoint: https_spiffe with the bundle in force and the
// endpoint's SPIFFE ID (go-spiffe's tlsconfig, as its federation fetcher uses), https_web
// with the configured or the system's roots.
func (w *peerWatcher) tlsConfig() (*tls.Config, error) {
	if w.rel.Profile == ProfileWeb {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if w.rel.EndpointCA != "" {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM([]byte(w.rel.EndpointCA)) {
				return nil, fmt.Errorf("trust: federation %s: endpoint CA: no PEM certificate", w.td)
			}
			tc.RootCAs = pool
		}
		return tc, nil
	}
	id, err := spiffeid.FromString(w.rel.EndpointSPIFFEID)
	if err != nil {
		return nil, err
	}
	b := w.InForce()
	if b == nil {
		return nil, fmt.Errorf("trust: federation %s: no bundle to authenticate the endpoint with", w.td)
	}
	return tlsconfig.TLSClientConfig(x509bundle.NewSet(b.X509Bundle()), tlsconfig.AuthorizeID(id)), nil
}

// classifyFetchError names why a GET failed.
func classifyFetchError(ctx context.Context, err error) string {
	var (
		unknown  x509.UnknownAuthorityError
		invalid  x509.CertificateInvalidError
		hostname x509.HostnameError
		verify   *tls.CertificateVerificationError
	)
	msg := err.Error()
	switch {
	case strings.Contains(msg, "unexpected ID"):
		return ReasonEndpointID
	case errors.As(err, &unknown), errors.As(err, &invalid), errors.As(err, &hostname), errors.As(err, &verify),
		strings.Contains(msg, "x509svid:"), strings.Contains(msg, "x509:"), strings.Contains(msg, "tls:"):
		return ReasonTLS
	case errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil || strings.Contains(msg, "timeout"):
		return ReasonTimeout
	}
	return ReasonUnreachable
}
