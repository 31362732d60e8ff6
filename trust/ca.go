package trust

import (
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"time"

	"istio.io/api/label"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

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
// up to and including the root. An Authority is never changed after it is made (rotation
// and reload make new ones), so it is safe for concurrent use; Key is the only secret.
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
	return certsPEM(a.TrustAnchors())
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

// NewRoot makes a self-signed root CA (ECDSA P-256) for td. The root names td in a URI
// SAN (spiffe://<td>), which is how ParsePlugged and bundle checks tell which trust
// domain a root anchors.
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
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	tdURI, err := url.Parse(td.IDString())
	if err != nil {
		return nil, fmt.Errorf("trust: new root: %w", err)
	}
	cert, err := issue(&x509.Certificate{
		URIs:                  []*url.URL{tdURI}, // names the trust domain the root anchors
		Subject:               pkix.Name{Organization: []string{o.Organization}, CommonName: "Isthmus root CA for " + string(td)},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, key.Public(), o.TTL, nil, key)
	if err != nil {
		return nil, fmt.Errorf("trust: create root: %w", err)
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
	key, err := newKey()
	if err != nil {
		return nil, err
	}
	// MaxPathLen 0: the intermediate signs leaves only, never another CA. The permitted
	// URI domain is the name constraint that keeps its identities inside a's trust domain.
	cert, err := issue(&x509.Certificate{
		Subject:               pkix.Name{Organization: a.Cert.Subject.Organization, CommonName: "Isthmus intermediate CA for cluster " + string(o.Cluster)},
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		PermittedURIDomains:   []string{string(a.TrustDomain)},
	}, key.Public(), o.TTL, a, nil)
	if err != nil {
		return nil, fmt.Errorf("trust: create intermediate for %s: %w", o.Cluster, err)
	}
	// The new CA's chain is its issuer and the issuer's chain; a root's own chain is
	// empty, so an intermediate straight under a root has just the root.
	chain := append([]*x509.Certificate{a.Cert}, a.Chain...)
	if a.Cert == a.Root {
		chain = []*x509.Certificate{a.Root}
	}
	return &Authority{TrustDomain: a.TrustDomain, Cert: cert, Key: key, Chain: chain, Root: a.Root}, nil
}

// PluggedFiles returns the four plug-in CA files for a.
func (a *Authority) PluggedFiles() (map[string][]byte, error) {
	key, err := keyPEM(a.Key)
	if err != nil {
		return nil, err
	}
	return map[string][]byte{
		CACertFile:    certPEM(a.Cert),
		CAKeyFile:     key,
		RootCertFile:  a.AnchorsPEM(),
		CertChainFile: append(certPEM(a.Cert), certsPEM(a.Chain)...), // Istio's layout: ca-cert first
	}, nil
}

// PluggedSecret returns the plug-in CA files as the Secret "cacerts" in namespace,
// labelled with the cluster it is for (topology.istio.io/cluster) and as managed by
// Isthmus: what `isthmus trust intermediate -o yaml` prints for kubectl apply. TypeMeta
// is set, so the printed object applies as it is.
func (a *Authority) PluggedSecret(namespace string, cluster mesh.ClusterID) (*corev1.Secret, error) {
	files, err := a.PluggedFiles()
	if err != nil {
		return nil, err
	}
	return &corev1.Secret{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"},
		ObjectMeta: metav1.ObjectMeta{Name: SecretName, Namespace: namespace,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "isthmus", label.TopologyCluster.Name: string(cluster)}},
		Data: files,
	}, nil
}

// WriteDir writes the plug-in CA files into dir (the key readable by the owner only). The
// files are written one after another, not atomically: for a directory a running primary
// reads, use DirStore.Save.
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
	} else if td, ok := rootTrustDomain(cert); ok {
		a.TrustDomain = td
	}
	if err := a.verifySelf(); err != nil {
		return nil, err
	}
	return a, nil
}

// verifySelf checks that a's certificate chains to its root through a's chain, for any
// usage (a CA certificate carries none of its own). A root trivially does.
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

// RootPEM returns the root certificate in PEM.
func (a *Authority) RootPEM() []byte { return certPEM(a.Root) }
