package trust

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Audience is the token audience the CA asks TokenReview to check, as Istio's does.
const Audience = "istio-ca"

// ClusterClients gives the CA a client for the cluster a caller says it is in. The primary
// implements it with its cluster watchers' clients (the remote reader may create
// TokenReviews).
type ClusterClients interface {
	// Client returns the client for cluster, false when the CA has no credentials for it
	// (the caller is then refused as Unauthenticated, never reviewed elsewhere). It is
	// called once per uncached request, concurrently, and must not block on the network.
	Client(cluster mesh.ClusterID) (kubernetes.Interface, bool)
}

// StaticClients is a ClusterClients from a fixed map.
type StaticClients map[mesh.ClusterID]kubernetes.Interface

// Client implements ClusterClients.
func (s StaticClients) Client(c mesh.ClusterID) (kubernetes.Interface, bool) {
	cs, ok := s[c]
	return cs, ok
}

// ServerConfig configures a CA server.
type ServerConfig struct {
	// Authority signs; required.
	Authority *Authority
	// Clusters authenticates callers' tokens; required.
	Clusters ClusterClients
	// LocalCluster is the cluster of callers that send no clusterid metadata; required.
	LocalCluster mesh.ClusterID
	// DefaultTTL is the validity of a leaf when the caller asks for none; default 24 h.
	DefaultTTL time.Duration
	// MaxTTL bounds requested validity; default 90 days.
	MaxTTL time.Duration
	// ReviewCacheTTL bounds how long a successful TokenReview is reused; default 30 s. Never
	// past the token's own expiry.
	ReviewCacheTTL time.Duration
	// Signer, when set, signs instead of Authority (e.g. a CertManagerSigner). Authority
	// still names the trust domain and the roots client certificates of renewals must
	// chain to.
	Signer Signer
	// Log receives refusals; nil discards.
	Log *slog.Logger
	// Metrics registers the CA's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

// Server implements istio.v1.auth.IstioCertificateService. It is safe for concurrent use:
// every request reads the current Authority once, and the review cache has its own lock.
type Server struct {
	pb.UnimplementedIstioCertificateServiceServer
	cfg     ServerConfig
	issued  prometheus.Counter
	refused *prometheus.CounterVec
	reviews *prometheus.CounterVec
	// certRefused counts client certificates refused at the handshake.
	certRefused prometheus.Counter

	// mu guards cache only; it is never held across a TokenReview or a signature.
	mu sync.Mutex
	// cache holds successful TokenReviews by (cluster, SHA-256 of the token), so the CA
	// keeps no bearer token in memory.
	cache map[string]cachedReview

	// auth is the signing authority, swapped by SetAuthority (a reloaded plug-in CA).
	auth atomic.Pointer[Authority]
}

// cachedReview is one successful TokenReview: the identity it proved, until expires.
type cachedReview struct {
	id      mesh.Identity
	expires time.Time
}

// NewServer validates cfg, fills in the documented defaults and registers the CA's
// metrics (an error if cfg.Metrics already holds them) and returns a CA server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Authority == nil || cfg.Clusters == nil || cfg.LocalCluster == "" {
		return nil, errors.New("trust: CA server: Authority, Clusters and LocalCluster are required")
	}
	if cfg.DefaultTTL == 0 {
		cfg.DefaultTTL = 24 * time.Hour
	}
	if cfg.MaxTTL == 0 {
		cfg.MaxTTL = 90 * 24 * time.Hour
	}
	if cfg.ReviewCacheTTL == 0 {
		cfg.ReviewCacheTTL = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Metrics == nil {
		cfg.Metrics = prometheus.NewRegistry()
	}
	s := &Server{
		cfg:     cfg,
		cache:   map[string]cachedReview{},
		issued:  prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_trust_certificates_issued_total", Help: "Workload certificates issued."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_trust_csr_refused_total", Help: "CSRs refused, by gRPC code."}, []string{"code"}),
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_trust_token_reviews_total", Help: "Token authentications, by result (cached, reviewed, failed)."}, []string{"result"}),
		certRefused: prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_trust_client_certificates_refused_total",
			Help: "Client certificates refused at the TLS handshake (expired, or not chaining to the trust anchors)."}),
	}
	s.auth.Store(cfg.Authority)
	for _, c := range []prometheus.Collector{s.issued, s.refused, s.reviews, s.certRefused} {
		if err := cfg.Metrics.Register(c); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Register adds the service to a gRPC server.
func (s *Server) Register(g *grpc.Server) { pb.RegisterIstioCertificateServiceServer(g, s) }

// authority returns the current signing authority. A caller reads it once per request
// and uses that value throughout, so a concurrent SetAuthority never mixes two CAs.
func (s *Server) authority() *Authority { return s.auth.Load() }

// SetAuthority swaps the signing authority: requests already signing finish with the old
// one, later ones use a. The trust domain must stay the same.
func (s *Server) SetAuthority(a *Authority) error {
	if a == nil {
		return fmt.Errorf("trust: CA server: nil authority")
	}
	if cur := s.authority(); cur.TrustDomain != a.TrustDomain {
		return fmt.Errorf("trust: CA server: new authority is for %s, the server signs for %s", a.TrustDomain, cur.TrustDomain)
	}
	s.auth.Store(a)
	return nil
}

// CreateCertificate implements the Istio CSR API. Every refusal is a gRPC status with the
// reason (see create), counted in isthmus_trust_csr_refused_total by code and logged;
// nothing is issued unless the caller is authenticated and the CSR asks for its identity.
func (s *Server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	resp, err := s.create(ctx, req)
	if err != nil {
		code := status.Code(err)
		s.refused.WithLabelValues(code.String()).Inc()
		s.cfg.Log.Info("refused CSR", "code", code, "err", err)
		return nil, err
	}
	s.issued.Inc()
	return resp, nil
}

// create authenticates the caller, parses the CSR, bounds the validity and signs. It maps
// the signer's sentinel errors to codes: ErrWrongIdentity → PermissionDenied, ErrBadCSR →
// InvalidArgument, ErrSignerRefused → FailedPrecondition, a deadline → DeadlineExceeded,
// anything else → Internal.
func (s *Server) create(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	id, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	csr, err := ParseCSR([]byte(req.GetCsr()))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	ttl := s.cfg.DefaultTTL
	if v := req.GetValidityDuration(); v < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "trust: validity_duration %d is negative", v)
	} else if v > 0 {
		ttl = min(time.Duration(v)*time.Second, s.cfg.MaxTTL)
	}
	// One signing path: the configured backend, else the current Authority (which
	// implements Signer). The Authority is read once per request, so a SetAuthority
	// during the call does not mix two CAs in one chain.
	var signer Signer = s.authority()
	if s.cfg.Signer != nil {
		signer = s.cfg.Signer
	}
	chain, err := signer.Sign(ctx, csr, id, ttl)
	switch {
	case errors.Is(err, ErrWrongIdentity):
		return nil, status.Error(codes.PermissionDenied, err.Error())
	case errors.Is(err, ErrBadCSR):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrSignerRefused):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return nil, status.Error(codes.DeadlineExceeded, err.Error())
	case err != nil:
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// authenticate returns the caller's identity: from a client certificate that chains to
// this CA's root (a renewal), else from its service-account token.
func (s *Server) authenticate(ctx context.Context) (mesh.Identity, error) {
	if id, ok := s.peerIdentity(ctx); ok {
		return id, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	token := ""
	for _, v := range md.Get("authorization") {
		if t, ok := strings.CutPrefix(v, "Bearer "); ok {
			token = strings.TrimSpace(t)
		}
	}
	if token == "" {
		return mesh.Identity{}, status.Error(codes.Unauthenticated, "trust: no bearer token (metadata authorization: Bearer <service-account token>) and no client certificate")
	}
	cluster := s.cfg.LocalCluster
	if v := md.Get("clusterid"); len(v) > 0 && v[0] != "" {
		c, err := mesh.ParseClusterID(v[0])
		if err != nil {
			return mesh.Identity{}, status.Errorf(codes.Unauthenticated, "trust: metadata clusterid: %v", err)
		}
		cluster = c
	}
	return s.review(ctx, cluster, token)
}

// peerIdentity returns the identity of a caller that presents a client certificate
// chaining (for client auth) to any current trust anchor and naming exactly one SPIFFE
// ID. Anything else — no TLS, no certificate, a chain to a retired root — is not an
// error: the caller falls back to its token.
func (s *Server) peerIdentity(ctx context.Context) (mesh.Identity, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return mesh.Identity{}, false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 {
		return mesh.Identity{}, false
	}
	leaf := ti.State.PeerCertificates[0]
	roots := s.authority().AnchorPool()
	inter := x509.NewCertPool()
	for _, c := range ti.State.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return mesh.Identity{}, false
	}
	if len(leaf.URIs) != 1 {
		return mesh.Identity{}, false
	}
	id, err := mesh.ParseIdentity(leaf.URIs[0].String())
	return id, err == nil
}

// review checks token with a TokenReview in cluster, reusing a recent success. The lock is
// dropped for the review itself (an API call), so two first requests with one token may
// both review it; the second result simply replaces the first. Failures are not cached:
// a token that was just rejected is reviewed again next time.
func (s *Server) review(ctx context.Context, cluster mesh.ClusterID, token string) (mesh.Identity, error) {
	sum := sha256.Sum256([]byte(token))
	key := string(cluster) + "/" + base64.RawStdEncoding.EncodeToString(sum[:])
	now := time.Now()
	s.mu.Lock()
	if c, ok := s.cache[key]; ok && now.Before(c.expires) {
		s.mu.Unlock()
		s.reviews.WithLabelValues("cached").Inc()
		return c.id, nil
	}
	s.mu.Unlock()
	client, ok := s.cfg.Clusters.Client(cluster)
	if !ok {
		s.reviews.WithLabelValues("failed").Inc()
		return mesh.Identity{}, status.Errorf(codes.Unauthenticated, "trust: unknown cluster %q: this CA has no credentials for it", cluster)
	}
	tr, err := client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		s.reviews.WithLabelValues("failed").Inc()
		return mesh.Identity{}, status.Errorf(codes.Unavailable, "trust: TokenReview in cluster %s: %v", cluster, err)
	}
	if !tr.Status.Authenticated {
		s.reviews.WithLabelValues("failed").Inc()
		return mesh.Identity{}, status.Errorf(codes.Unauthenticated, "trust: token rejected by cluster %s: %s", cluster, tr.Status.Error)
	}
	ns, sa, ok := parseSAUser(tr.Status.User.Username)
	if !ok {
		s.reviews.WithLabelValues("failed").Inc()
		return mesh.Identity{}, status.Errorf(codes.Unauthenticated, "trust: %q is not a service account", tr.Status.User.Username)
	}
	id, err := mesh.NewIdentity(s.authority().TrustDomain, ns, sa)
	if err != nil {
		return mesh.Identity{}, status.Error(codes.Unauthenticated, err.Error())
	}
	s.reviews.WithLabelValues("reviewed").Inc()
	expires := now.Add(s.cfg.ReviewCacheTTL)
	if exp, ok := tokenExpiry(token); ok && exp.Before(expires) {
		expires = exp
	}
	s.mu.Lock()
	if len(s.cache) > 100000 { // bounded: drop everything rather than grow without limit
		s.cache = map[string]cachedReview{}
	}
	s.cache[key] = cachedReview{id: id, expires: expires}
	s.mu.Unlock()
	return id, nil
}

// parseSAUser splits "system:serviceaccount:<ns>:<sa>".
func parseSAUser(u string) (ns, sa string, ok bool) {
	rest, ok := strings.CutPrefix(u, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, sa, ok = strings.Cut(rest, ":")
	return ns, sa, ok && ns != "" && sa != ""
}

// tokenExpiry reads a JWT's exp claim without verifying it: only to bound how long a
// review that the API server already accepted is reused.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(payload, &claims) != nil || claims.Exp == 0 {
		return time.Time{}, false
	}
	return time.Unix(claims.Exp, 0), true
}

// TrustStatus is what a CA serves right now (/debug/trustz).
type TrustStatus struct {
	TrustDomain string `json:"trustDomain"`
	// Signer is the signing certificate's subject, serial and expiry.
	Signer         string    `json:"signer"`
	SignerNotAfter time.Time `json:"signerNotAfter"`
	// Root is the fingerprint of the root the signer chains to; Anchors of every root
	// handed to workloads.
	Root    string   `json:"root"`
	Anchors []string `json:"anchors"`
}

// Status returns what the server signs with and hands out.
func (s *Server) Status() TrustStatus {
	a := s.authority()
	st := TrustStatus{TrustDomain: string(a.TrustDomain), Signer: fmt.Sprintf("%s (serial %s)", a.Cert.Subject, a.Cert.SerialNumber),
		SignerNotAfter: a.Cert.NotAfter, Root: Fingerprint(a.Root.Raw)}
	for _, c := range a.TrustAnchors() {
		st.Anchors = append(st.Anchors, Fingerprint(c.Raw))
	}
	return st
}

// DebugHandler serves Status as JSON (mounted at /debug/trustz).
func (s *Server) DebugHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetIndent("", "  ")
		enc.Encode(s.Status())
		w.Header().Set("Content-Type", "application/json")
		w.Write(b.Bytes())
	})
}

// FetchStatus reads a CA's TrustStatus from its DebugHandler at url (a primary's
// /debug/trustz): how `isthmus trust rotate` confirms that every CA serves a phase. A
// status other than 200 is an error that says the primary may be running without a CA.
func FetchStatus(ctx context.Context, client *http.Client, url string) (TrustStatus, error) {
	var st TrustStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return st, fmt.Errorf("trust: status: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return st, fmt.Errorf("trust: status: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("trust: status: %s: %s (is the primary running with --ca-dir?)", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("trust: status from %s: %w", url, err)
	}
	return st, nil
}
