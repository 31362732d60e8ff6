package trust

import (
	"context"
	"crypto/x509"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Authenticate proves who is calling on ctx for another service on the CA's port (the
// primary's secure xDS): a client certificate that chains to the trust anchors, for
// client authentication, with one SPIFFE URI (certificate true); else the
// service-account token of the "authorization: Bearer" metadata, reviewed in cluster with
// the CA's own TokenReview cache. Unlike a CSR, a presented certificate that does not
// verify is a refusal, not a reason to look for a token: a proxy that shows a foreign
// certificate learns why. Errors are gRPC status errors: Unauthenticated, or Unavailable
// when the review could not be made.
//
// The certificate is the connection's, checked for its validity period at the handshake
// (VerifyClientCertificate, which the port must use). Here it must still chain to the
// anchors of the moment (a rotation may have retired its root since), but may have
// expired since the handshake: a connection stays authenticated by the certificate it
// was opened with, as a TLS session does. gRPC clients open new streams on old
// connections — grpc-go's xDS clients, one per channel target, share one — and refusing
// them for an expiry the handshake could not foresee refused such a client's new streams
// for as long as the connection lived, however often its agent renewed.
func (s *Server) Authenticate(ctx context.Context, cluster mesh.ClusterID) (mesh.Identity, bool, error) {
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			id, err := s.verifyPeer(ti.State.PeerCertificates)
			if err != nil {
				return mesh.Identity{}, true, status.Errorf(codes.Unauthenticated, "trust: client certificate: %v", err)
			}
			return id, true, nil
		}
	}
	md, _ := metadata.FromIncomingContext(ctx)
	token := ""
	for _, v := range md.Get("authorization") {
		if t, ok := strings.CutPrefix(v, "Bearer "); ok {
			token = strings.TrimSpace(t)
		}
	}
	if token == "" {
		return mesh.Identity{}, false, status.Error(codes.Unauthenticated, "trust: no client certificate and no bearer token (metadata authorization: Bearer <service-account token>)")
	}
	id, err := s.review(ctx, cluster, token)
	return id, false, err
}

// VerifyClientCertificate is the tls.Config.VerifyPeerCertificate of the CA's port, which
// requests client certificates without requiring them: a caller that presents none passes
// (it authenticates with a token), and a presented chain must verify, for client
// authentication, against the trust anchors of the moment — or the handshake fails. It
// is counted in isthmus_trust_client_certificates_refused_total and logged.
//
// Why at the handshake, though Authenticate checks the chain again per stream: the
// certificate belongs to the connection. A stream refused for it is refused again on
// every retry over that connection, and gRPC clients retry streams on a connection that
// stays up — a workload whose certificate expired while its primary was away kept
// retrying xDS streams on the connection it opened with the expired certificate, long
// after its agent had renewed it. A failed handshake makes the client connect again,
// with the certificate it holds by then. (Istio's control plane verifies at the
// handshake too.)
func (s *Server) VerifyClientCertificate(raw [][]byte, _ [][]*x509.Certificate) error {
	if len(raw) == 0 {
		return nil
	}
	chain := make([]*x509.Certificate, 0, len(raw))
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return s.refuseClientCert(fmt.Errorf("trust: client certificate: %w", err))
		}
		chain = append(chain, c)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: s.authority().AnchorPool(), Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return s.refuseClientCert(fmt.Errorf("trust: client certificate %s: does not verify against the mesh's trust anchors: %w", subjectOf(chain[0]), err))
	}
	return nil
}

func (s *Server) refuseClientCert(err error) error {
	s.certRefused.Inc()
	s.cfg.Log.Info("refused a client certificate at the handshake", "err", err)
	return err
}

// subjectOf names a certificate by its URI SAN (a SPIFFE ID), else its subject.
func subjectOf(c *x509.Certificate) string {
	if len(c.URIs) > 0 {
		return c.URIs[0].String()
	}
	return c.Subject.String()
}

// verifyPeer checks a connection's client chain against the current trust anchors, as of
// now or, for a leaf that has expired since the handshake verified it, as of its last
// valid moment (Authenticate says why).
func (s *Server) verifyPeer(chain []*x509.Certificate) (mesh.Identity, error) {
	leaf := chain[0]
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	at := time.Now()
	if at.After(leaf.NotAfter) {
		at = leaf.NotAfter
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.authority().AnchorPool(), Intermediates: inter, CurrentTime: at,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return mesh.Identity{}, fmt.Errorf("does not chain to the mesh's trust anchors: %w", err)
	}
	if len(leaf.URIs) != 1 {
		return mesh.Identity{}, fmt.Errorf("has %d URI names, want exactly one SPIFFE ID", len(leaf.URIs))
	}
	return mesh.ParseIdentity(leaf.URIs[0].String())
}
