package trust

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// ErrBadCSR is wrapped by every refusal of a malformed or unacceptable CSR.
var ErrBadCSR = errors.New("trust: bad certificate signing request")

// ErrWrongIdentity is wrapped when a CSR asks for an identity other than the caller's.
var ErrWrongIdentity = errors.New("trust: CSR asks for an identity that is not the caller's")

// ParseCSR decodes one PEM "CERTIFICATE REQUEST" and checks its signature.
func ParseCSR(data []byte) (*x509.CertificateRequest, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrBadCSR)
	}
	if block.Type != pemCSR && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: PEM block is %q, want CERTIFICATE REQUEST", ErrBadCSR, block.Type)
	}
	if len(pemRest(rest)) > 0 {
		return nil, fmt.Errorf("%w: more than one PEM block", ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %v", ErrBadCSR, err)
	}
	return csr, nil
}

// checkCSRIdentity allows a CSR only if it asks for exactly id (or for nothing, in which
// case the CA fills id in) and for no other kind of name.
func checkCSRIdentity(csr *x509.CertificateRequest, id mesh.Identity) error {
	if len(csr.DNSNames) > 0 || len(csr.EmailAddresses) > 0 || len(csr.IPAddresses) > 0 {
		return fmt.Errorf("%w: workload certificates carry only a SPIFFE URI (CSR asks for DNS, e-mail or IP names)", ErrWrongIdentity)
	}
	for _, u := range csr.URIs {
		if u.String() != id.String() {
			return fmt.Errorf("%w: CSR asks for %s, caller is %s", ErrWrongIdentity, u, id)
		}
	}
	return nil
}

// Sign issues a leaf for id with the CSR's public key, valid for ttl from now (cut to the
// authority's own expiry), and returns the chain leaf first, root last, in PEM. The CSR
// must ask for id or for no name at all. It implements Signer: the CA server signs with
// its Authority through the same interface as with cert-manager. Signing is local and
// never blocks, so ctx is not consulted.
func (a *Authority) Sign(_ context.Context, csr *x509.CertificateRequest, id mesh.Identity, ttl time.Duration) ([]string, error) {
	if id.TrustDomain != a.TrustDomain {
		return nil, fmt.Errorf("%w: %s is outside this CA's trust domain %s", ErrWrongIdentity, id, a.TrustDomain)
	}
	if err := checkCSRIdentity(csr, id); err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("%w: validity must be positive", ErrBadCSR)
	}
	u, err := url.Parse(id.String())
	if err != nil {
		return nil, fmt.Errorf("trust: identity %s: %w", id, err)
	}
	leaf, err := issueDER(&x509.Certificate{
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{u},
	}, csr.PublicKey, ttl, a, nil)
	if err != nil {
		return nil, fmt.Errorf("trust: sign for %s: %w", id, err)
	}
	chain := []string{string(pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: leaf})), string(certPEM(a.Cert))} // a.Cert is the root itself when a is a root
	for _, c := range a.Chain {
		chain = append(chain, string(certPEM(c)))
	}
	// The last element carries every trust anchor (Istio's agents write it as the root
	// file), so workloads trust both roots while one rotates.
	if len(a.Anchors) > 1 {
		chain[len(chain)-1] = string(a.AnchorsPEM())
	}
	return chain, nil
}

// IssueServing issues a TLS server certificate for the CA's own endpoints (for example
// istiod.istio-system.svc on port 15012), with DNS names and a fresh key. It returns the
// chain leaf first and without the root (a TLS server sends what the client cannot
// already hold). Workload CSRs never get DNS names; this is for the control plane only.
func (a *Authority) IssueServing(dnsNames []string, ttl time.Duration) (certPEMs [][]byte, key *ecdsa.PrivateKey, err error) {
	key, err = newKey()
	if err != nil {
		return nil, nil, err
	}
	leaf, err := issue(&x509.Certificate{
		DNSNames:    dnsNames,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, key.Public(), ttl, a, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("trust: issue serving certificate: %w", err)
	}
	certPEMs = append(certPEMs, certPEM(leaf))
	if a.Cert != a.Root {
		certPEMs = append(certPEMs, certPEM(a.Cert))
		for _, c := range a.Chain[:len(a.Chain)-1] { // not the root
			certPEMs = append(certPEMs, certPEM(c))
		}
	}
	return certPEMs, key, nil
}

// ServingNames are the DNS names the primary's CA serving certificate carries: Istio's
// (istiod.<namespace>.svc, with and without the cluster domain, which istio-agent and
// grpc-go's bootstrap dial), Isthmus's own Service name, and localhost for a primary run
// on the host.
func ServingNames(namespace, domain string) []string {
	return []string{"istiod." + namespace + ".svc", "istiod." + namespace + ".svc." + domain, "isthmus-primary." + namespace + ".svc", "localhost"}
}

// ServingCertificate issues a serving certificate for dnsNames (IssueServing) and
// assembles it, with its key, into the tls.Certificate a gRPC or HTTPS server presents.
func (a *Authority) ServingCertificate(dnsNames []string, ttl time.Duration) (tls.Certificate, error) {
	certs, key, err := a.IssueServing(dnsNames, ttl)
	if err != nil {
		return tls.Certificate{}, err
	}
	kp, err := keyPEM(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	tc, err := tls.X509KeyPair(bytes.Join(certs, nil), kp)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("trust: serving certificate: %w", err)
	}
	return tc, nil
}
