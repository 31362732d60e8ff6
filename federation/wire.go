package federation

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// serviceName is the gRPC service every federation endpoint serves.
const serviceName = "isthmus.federation.v1.Federation"

// Method paths of the service.
const (
	methodBundle    = "/" + serviceName + "/Bundle"
	methodEstablish = "/" + serviceName + "/Establish"
	methodWatch     = "/" + serviceName + "/Watch"
)

// EndpointServiceAccount is the service account part of a federation endpoint's SPIFFE
// ID: spiffe://<trust domain>/ns/<control-plane namespace>/sa/isthmus-federation.
const EndpointServiceAccount = "isthmus-federation"

// IssueEndpointCertificate issues the federation endpoint's certificate (server and
// client auth) from the mesh's CA, for spiffe://<td>/ns/<namespace>/sa/isthmus-federation,
// with the chain up to (not including) the root.
func IssueEndpointCertificate(ctx context.Context, a *trust.Authority, namespace string, ttl time.Duration) (*tls.Certificate, error) {
	id, err := mesh.NewIdentity(a.TrustDomain, namespace, EndpointServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint identity: %w", err)
	}
	return issueCertificate(ctx, a, id, ttl)
}

// issueCertificate issues a certificate of id from a (a fresh P-256 key), the root left
// out of the chain.
func issueCertificate(ctx context.Context, a *trust.Authority, id mesh.Identity, ttl time.Duration) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint key: %w", err)
	}
	u, _ := url.Parse(id.String())
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint CSR: %w", err)
	}
	chain, err := a.Sign(ctx, csr, id, ttl)
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: key}
	for i, p := range chain {
		if i == len(chain)-1 && len(chain) > 1 {
			break // the root: the peer holds it in our bundle
		}
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			return nil, errors.New("federation: endpoint certificate: bad PEM from the CA")
		}
		cert.Certificate = append(cert.Certificate, b.Bytes)
	}
	cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("federation: endpoint certificate: %w", err)
	}
	return cert, nil
}

// rootsPEM encodes roots.
func rootsPEM(roots []*x509.Certificate) string {
	var b bytes.Buffer
	for _, r := range roots {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})
	}
	return b.String()
}

// parseRoots decodes a peer's bundle: at least one certificate, every one a CA.
func parseRoots(s string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := []byte(s)
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("bundle: unexpected PEM block %q", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("bundle: %w", err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("bundle: %q is not a CA certificate", c.Subject)
		}
		out = append(out, c)
	}
	if len(out) == 0 || len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("bundle: want PEM CA certificates and nothing else")
	}
	return out, nil
}

// Why verifySVID refused a certificate (wrapped in its errors).
var (
	errNoChain     = errors.New("does not chain to the peering's bundle")
	errWrongDomain = errors.New("another trust domain")
)

// verifySVID checks that a peer's leaf names a SPIFFE ID in td (first, so that a peer of
// another domain is told so) and that its chain verifies against roots.
func verifySVID(raw [][]byte, roots []*x509.Certificate, td mesh.TrustDomain) error {
	if len(raw) == 0 {
		return errors.New("no certificate presented")
	}
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, r := range raw {
		c, err := x509.ParseCertificate(r)
		if err != nil {
			return fmt.Errorf("peer certificate: %w", err)
		}
		certs = append(certs, c)
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	got, err := svidDomain(certs[0])
	if err != nil {
		return err
	}
	if got != td {
		return fmt.Errorf("peer certificate is of trust domain %s, want %s (%w)", got, td, errWrongDomain)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("peer certificate %w of %s: %w", errNoChain, td, err)
	}
	return nil
}

// svidDomain returns the trust domain of a leaf's only SPIFFE URI.
func svidDomain(c *x509.Certificate) (mesh.TrustDomain, error) {
	if len(c.URIs) != 1 || c.URIs[0].Scheme != "spiffe" {
		return "", errors.New("peer certificate has no single SPIFFE ID")
	}
	return mesh.ParseTrustDomain(c.URIs[0].Host)
}

// peerCerts returns the raw certificate chain the gRPC peer presented.
func peerCerts(ctx context.Context) [][]byte {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil
	}
	var out [][]byte
	for _, c := range ti.State.PeerCertificates {
		out = append(out, c.Raw)
	}
	return out
}

// jsonCodec encodes messages as strict JSON; a *rawFrame passes its bytes through, so a
// catalog is decoded by DecodeCatalog exactly as it arrived.
type jsonCodec struct{}

type rawFrame struct{ b []byte }

func (jsonCodec) Marshal(v any) ([]byte, error) {
	if r, ok := v.(*rawFrame); ok {
		return r.b, nil
	}
	return json.Marshal(v)
}

func (jsonCodec) Unmarshal(b []byte, v any) error {
	if r, ok := v.(*rawFrame); ok {
		r.b = append([]byte(nil), b...)
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func (jsonCodec) Name() string { return "json" }

// bundleRequest asks an endpoint who it is; answered without client authentication.
type bundleRequest struct{}

type bundleResponse struct {
	Mesh        mesh.MeshID      `json:"mesh"`
	TrustDomain mesh.TrustDomain `json:"trustDomain"`
	RootsPEM    string           `json:"rootsPEM"`
	// FederationID is the federation the endpoint is in (empty if none): not secret, it
	// is the gossip label; a dialer in another federation refuses before using the token.
	FederationID string `json:"federationID,omitempty"`
}

type establishRequest struct {
	PeeringID   string           `json:"peeringID"`
	Secret      []byte           `json:"secret"`
	Mesh        mesh.MeshID      `json:"mesh"`
	TrustDomain mesh.TrustDomain `json:"trustDomain"`
	Addresses   []string         `json:"addresses"`
	RootsPEM    string           `json:"rootsPEM"`
	// GossipAddr is the dialer's gossip address, so the acceptor can rejoin it.
	GossipAddr string `json:"gossipAddr,omitempty"`
}

type establishResponse struct {
	FederationID     string   `json:"federationID"`
	FederationSecret []byte   `json:"federationSecret"`
	GossipAddrs      []string `json:"gossipAddrs"`
}

type watchRequest struct {
	Mesh mesh.MeshID `json:"mesh"`
}

// federationServer is what the service handlers call (the Endpoint).
type federationServer interface {
	bundle(ctx context.Context) (*bundleResponse, error)
	establish(ctx context.Context, req *establishRequest) (*establishResponse, error)
	watch(req *watchRequest, stream grpc.ServerStream) error
	follow(req *followRequest, stream grpc.ServerStream) error
}

var serviceDesc = grpc.ServiceDesc{
	ServiceName: serviceName,
	HandlerType: (*federationServer)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Bundle", Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req bundleRequest
			if err := dec(&req); err != nil {
				return nil, err
			}
			return srv.(federationServer).bundle(ctx)
		}},
		{MethodName: "Establish", Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			var req establishRequest
			if err := dec(&req); err != nil {
				return nil, err
			}
			return srv.(federationServer).establish(ctx, &req)
		}},
	},
	Streams: []grpc.StreamDesc{{StreamName: "Watch", ServerStreams: true, Handler: func(srv any, stream grpc.ServerStream) error {
		var req watchRequest
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		return srv.(federationServer).watch(&req, stream)
	}}, {StreamName: "Follow", ServerStreams: true, Handler: func(srv any, stream grpc.ServerStream) error {
		var req followRequest
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		return srv.(federationServer).follow(&req, stream)
	}}},
}
