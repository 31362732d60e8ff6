package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Istio's plug-in CA file names (Secret "cacerts" or a directory).
const (
	CACertFile    = "ca-cert.pem"
	CAKeyFile     = "ca-key.pem"
	RootCertFile  = "root-cert.pem"
	CertChainFile = "cert-chain.pem"
	// SecretName is the Secret Istio (and Isthmus) read the plug-in CA from.
	SecretName = "cacerts"
)

// Authority is a signing CA: a key, its certificate, and the chain from that certificate
// up to and including the root.
type Authority struct {
	TrustDomain mesh.TrustDomain
	Cert        *x509.Certificate
	Key         crypto.Signer
	// Chain is Cert's issuers, nearest first, ending with the root; empty for a root.
	Chain []*x509.Certificate
	// Root is the root of this CA's own chain (Cert itself for a root).
	Root *x509.Certificate
	// Anchors are every root the CA's workloads must trust, Root among them: more than
	// one while a root rotates (root-cert.pem then holds several). Nil means just Root.
	Anchors []*x509.Certificate
}

// TrustAnchors returns the roots workloads must trust: Anchors, or Root alone.
func (a *Authority) TrustAnchors() []*x509.Certificate {
	if len(a.Anchors) == 0 {
		return []*x509.Certificate{a.Root}
	}
	return a.Anchors
}

// AnchorsPEM returns TrustAnchors as concatenated PEM (the content of root-cert.pem).
func (a *Authority) AnchorsPEM() []byte {
	var out []byte
	for _, c := range a.TrustAnchors() {
		out = append(out, certPEM(c)...)
	}
	return out
}

// AnchorPool returns TrustAnchors as a certificate pool.
func (a *Authority) AnchorPool() *x509.CertPool {
	pool := x509.NewCertPool()
	for _, c := range a.TrustAnchors() {
		pool.AddCert(c)
	}
	return pool
}

// RootOptions configures NewRoot.
type RootOptions struct {
	// TTL of the root; default 10 years.
	TTL time.Duration
	// Organization in the subject; default "Isthmus".
	Organization string
}

func serialNumber() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// NewRoot makes a self-signed root CA (ECDSA P-256) for td.
func NewRoot(td mesh.TrustDomain, o RootOptions) (*Authority, error) {
	if _, err := mesh.ParseTrustDomain(string(td)); err != nil {
		return nil, fmt.Errorf("trust: new root: %w", err)
	}
	if o.TTL == 0 {
		o.TTL = 10 * 365 * 24 * time.Hour
	}
	if o.Organization == "" {
		o.Organization = "Isthmus"
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-5 * time.Minute) // tolerate clock skew between clusters
	tdURI, err := url.Parse(td.IDString())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		URIs:                  []*url.URL{tdURI}, // names the trust domain the root anchors
		SerialNumber:          sn,
		Subject:               pkix.Name{Organization: []string{o.Organization}, CommonName: "Isthmus root CA for " + string(td)},
		NotBefore:             now,
		NotAfter:              now.Add(o.TTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("trust: create root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &Authority{TrustDomain: td, Cert: cert, Key: key, Root: cert}, nil
}

// IntermediateOptions configures Authority.NewIntermediate.
type IntermediateOptions struct {
	// Cluster names the cluster the intermediate is for (in its subject); required.
	Cluster mesh.ClusterID
	// TTL of the intermediate; default one year, cut to the issuer's remaining life.
	TTL time.Duration
}

// NewIntermediate issues an intermediate CA under a, name-constrained to a's trust domain:
// it can only sign identities spiffe://<td>/... (the permitted URI domain), whatever
// happens to its key.
func (a *Authority) NewIntermediate(o IntermediateOptions) (*Authority, error) {
	if _, err := mesh.ParseClusterID(string(o.Cluster)); err != nil {
		return nil, fmt.Errorf("trust: new intermediate: %w", err)
	}
	if o.TTL == 0 {
		o.TTL = 365 * 24 * time.Hour
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-5 * time.Minute)
	notAfter := now.Add(o.TTL)
	if notAfter.After(a.Cert.NotAfter) {
		notAfter = a.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               pkix.Name{Organization: a.Cert.Subject.Organization, CommonName: "Isthmus intermediate CA for cluster " + string(o.Cluster)},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		PermittedURIDomains:   []string{string(a.TrustDomain)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, key.Public(), a.Key)
	if err != nil {
		return nil, fmt.Errorf("trust: create intermediate for %s: %w", o.Cluster, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	chain := append([]*x509.Certificate{a.Cert}, a.Chain...)
	if a.Cert == a.Root {
		chain = []*x509.Certificate{a.Root}
	}
	return &Authority{TrustDomain: a.TrustDomain, Cert: cert, Key: key, Chain: chain, Root: a.Root}, nil
}

// PluggedFiles returns the four plug-in CA files for a.
func (a *Authority) PluggedFiles() (map[string][]byte, error) {
	keyDER, err := x509.MarshalPKCS8PrivateKey(a.Key)
	if err != nil {
		return nil, err
	}
	chain := certPEM(a.Cert)
	for _, c := range a.Chain {
		chain = append(chain, certPEM(c)...)
	}
	return map[string][]byte{
		CACertFile:    certPEM(a.Cert),
		CAKeyFile:     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		RootCertFile:  a.AnchorsPEM(),
		CertChainFile: chain,
	}, nil
}

// WriteDir writes the plug-in CA files into dir (the key readable by the owner only).
func (a *Authority) WriteDir(dir string) error {
	files, err := a.PluggedFiles()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, data := range files {
		mode := os.FileMode(0o644)
		if name == CAKeyFile {
			mode = 0o600
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, mode); err != nil {
			return fmt.Errorf("trust: write %s: %w", name, err)
		}
	}
	return nil
}

// LoadDir reads a plug-in CA directory.
func LoadDir(dir string) (*Authority, error) {
	files := map[string][]byte{}
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			if name == CertChainFile && errors.Is(err, os.ErrNotExist) {
				continue // a root used directly has no chain file
			}
			return nil, fmt.Errorf("trust: read plug-in CA: %w", err)
		}
		files[name] = data
	}
	return ParsePlugged(files)
}

// ParsePlugged builds an Authority from plug-in CA files (as in Secret cacerts): it checks
// that the key matches the certificate, that the certificate is a CA, and that the chain
// verifies to the root. The trust domain is taken from the certificate's permitted URI
// domain (Isthmus intermediates) or a root's spiffe://<td> URI, else "cluster.local".
func ParsePlugged(files map[string][]byte) (*Authority, error) {
	certs, err := parseCerts(files[CACertFile])
	if err != nil || len(certs) != 1 {
		return nil, fmt.Errorf("trust: %s must hold exactly one certificate (%v)", CACertFile, err)
	}
	cert := certs[0]
	if !cert.IsCA {
		return nil, fmt.Errorf("trust: %s is not a CA certificate", CACertFile)
	}
	roots, err := parseCerts(files[RootCertFile])
	if err != nil || len(roots) == 0 {
		return nil, fmt.Errorf("trust: %s: no certificate (%v)", RootCertFile, err)
	}
	block, _ := pem.Decode(files[CAKeyFile])
	if block == nil {
		return nil, fmt.Errorf("trust: %s: no PEM block", CAKeyFile)
	}
	key, err := parseKey(block)
	if err != nil {
		return nil, fmt.Errorf("trust: %s: %w", CAKeyFile, err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, fmt.Errorf("trust: %s does not match %s", CAKeyFile, CACertFile)
	}
	var chain []*x509.Certificate
	if len(files[CertChainFile]) > 0 {
		all, err := parseCerts(files[CertChainFile])
		if err != nil {
			return nil, fmt.Errorf("trust: %s: %w", CertChainFile, err)
		}
		// cert-chain.pem starts with ca-cert itself in Istio's layout.
		if len(all) > 0 && all[0].Equal(cert) {
			all = all[1:]
		}
		chain = all
	}
	// root-cert.pem may hold several roots (a rotation in progress); the CA's own root is
	// the one its chain ends with, or the certificate itself for a root CA.
	root := roots[0]
	switch {
	case slices.ContainsFunc(roots, cert.Equal):
		root = cert
	case len(chain) > 0:
		last := chain[len(chain)-1]
		if !slices.ContainsFunc(roots, last.Equal) {
			return nil, fmt.Errorf("trust: %s ends with %q, which %s does not hold", CertChainFile, last.Subject, RootCertFile)
		}
		root = last
	}
	a := &Authority{Cert: cert, Key: key, Chain: chain, Root: root, TrustDomain: "cluster.local"}
	if len(roots) > 1 {
		a.Anchors = append([]*x509.Certificate{root}, slices.DeleteFunc(slices.Clone(roots), root.Equal)...)
	}
	if cert.Equal(root) {
		a.Chain = nil
		a.Root = cert
	}
	if len(cert.PermittedURIDomains) == 1 {
		if td, err := mesh.ParseTrustDomain(cert.PermittedURIDomains[0]); err == nil {
			a.TrustDomain = td
		}
	} else if len(cert.URIs) == 1 && cert.URIs[0].Scheme == "spiffe" && cert.URIs[0].Path == "" {
		if td, err := mesh.ParseTrustDomain(cert.URIs[0].Host); err == nil {
			a.TrustDomain = td
		}
	}
	if err := a.verifySelf(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *Authority) verifySelf() error {
	if a.Cert == a.Root {
		return nil
	}
	roots := x509.NewCertPool()
	roots.AddCert(a.Root)
	inter := x509.NewCertPool()
	for _, c := range a.Chain {
		inter.AddCert(c)
	}
	if _, err := a.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("trust: %s does not chain to %s: %w", CACertFile, RootCertFile, err)
	}
	return nil
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return out, nil
}

func parseKey(block *pem.Block) (crypto.Signer, error) {
	var k any
	var err error
	switch block.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		k, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unsupported key block %q", block.Type)
	}
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", k)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ae, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ae.Equal(b)
}

// RootPEM returns the root certificate in PEM.
func (a *Authority) RootPEM() []byte { return certPEM(a.Root) }
