package trust

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// BundleSource says where a trust domain's bundle is read from: exactly one of File,
// PEMFile, CADir and Endpoint. It is what `isthmus trust bundle add` gathers from its
// flags; the reading and the checks live here so that every caller refuses the same
// inputs the same way.
type BundleSource struct {
	// File is a SPIFFE bundle (JWKS), as a bundle endpoint serves it.
	File string
	// PEMFile holds the domain's root certificates in PEM; other PEM blocks are skipped.
	PEMFile string
	// CADir is a plug-in CA directory; its root-cert.pem is read as PEMFile would be.
	CADir string
	// Endpoint is the URL of the domain's SPIFFE bundle endpoint (https_web profile).
	Endpoint string
	// EndpointCA is a PEM file of the CA that signs Endpoint's TLS certificate; empty
	// trusts the system's roots. Only read with Endpoint.
	EndpointCA string
}

// ReadBundle reads td's bundle from src and checks it with CheckBundle, so that what it
// returns can be stored as is. The error names the file or URL it came from.
func ReadBundle(ctx context.Context, td mesh.TrustDomain, src BundleSource) (*spiffebundle.Bundle, error) {
	if _, err := mesh.ParseTrustDomain(string(td)); err != nil {
		return nil, fmt.Errorf("trust: read bundle: %w", err)
	}
	given := 0
	for _, s := range []string{src.File, src.PEMFile, src.CADir, src.Endpoint} {
		if s != "" {
			given++
		}
	}
	if given != 1 {
		return nil, fmt.Errorf("trust: read bundle of %s: want exactly one of a bundle file, a PEM file, a CA directory and an endpoint, got %d", td, given)
	}
	b, err := readBundle(ctx, td, src)
	if err != nil {
		return nil, err
	}
	if err := CheckBundle(td, b, time.Now()); err != nil {
		return nil, err
	}
	return b, nil
}

// readBundle reads from the one source src names, unchecked.
func readBundle(ctx context.Context, td mesh.TrustDomain, src BundleSource) (*spiffebundle.Bundle, error) {
	switch {
	case src.File != "":
		data, err := os.ReadFile(src.File)
		if err != nil {
			return nil, fmt.Errorf("trust: bundle file: %w", err)
		}
		sid, err := spiffeid.TrustDomainFromString(string(td))
		if err != nil {
			return nil, fmt.Errorf("trust: bundle file %s: %w", src.File, err)
		}
		b, err := spiffebundle.Parse(sid, data)
		if err != nil {
			return nil, fmt.Errorf("trust: bundle file %s: %w", src.File, err)
		}
		return b, nil
	case src.Endpoint != "":
		var o FetchOptions
		if src.EndpointCA == "" {
			// https_web against a public certificate: the system's roots, as documented.
			roots, err := x509.SystemCertPool()
			if err != nil {
				return nil, fmt.Errorf("trust: endpoint %s: the system's roots: %w", src.Endpoint, err)
			}
			o.WebRoots = roots
		} else {
			data, err := os.ReadFile(src.EndpointCA)
			if err != nil {
				return nil, fmt.Errorf("trust: endpoint CA: %w", err)
			}
			o.WebRoots = x509.NewCertPool()
			if !o.WebRoots.AppendCertsFromPEM(data) {
				return nil, fmt.Errorf("trust: endpoint CA %s: no PEM certificate", src.EndpointCA)
			}
		}
		return FetchBundle(ctx, td, src.Endpoint, o)
	}
	path := src.PEMFile
	if src.CADir != "" {
		path = filepath.Join(src.CADir, RootCertFile)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("trust: bundle roots: %w", err)
	}
	b, err := ParsePEMBundle(td, data)
	if err != nil {
		return nil, fmt.Errorf("%w (in %s)", err, path)
	}
	return b, nil
}

// ParsePEMBundle makes td's bundle from the PEM root certificates in data (blocks of other
// types, such as a key, are skipped). It fails on a certificate that does not parse and
// when there is none; it does not check what the certificates are (CheckBundle does).
func ParsePEMBundle(td mesh.TrustDomain, data []byte) (*spiffebundle.Bundle, error) {
	sid, err := spiffeid.TrustDomainFromString(string(td))
	if err != nil {
		return nil, fmt.Errorf("trust: PEM bundle: %w", err)
	}
	b := spiffebundle.New(sid)
	for rest := data; ; {
		c, r, err := nextCert(rest)
		if err != nil {
			return nil, fmt.Errorf("trust: PEM bundle of %s: %w", td, err)
		}
		if c == nil {
			break
		}
		b.AddX509Authority(c)
		rest = r
	}
	if len(b.X509Authorities()) == 0 {
		return nil, fmt.Errorf("trust: PEM bundle of %s: no PEM certificate", td)
	}
	return b, nil
}

// ErrBadBundle is wrapped by every refusal of CheckBundle.
var ErrBadBundle = errors.New("trust: unacceptable trust bundle")

// CheckBundle refuses a bundle for td that workloads could not use as roots: one with no
// X.509 root, a root that is not a CA certificate, a root expired at now, or a root that
// names another trust domain in a spiffe://<domain> URI (as Isthmus roots do: a root
// added under the wrong domain). Roots without such a URI (Istio's, most others) pass
// that last check.
func CheckBundle(td mesh.TrustDomain, b *spiffebundle.Bundle, now time.Time) error {
	roots := b.X509Authorities()
	if len(roots) == 0 {
		return fmt.Errorf("%w: %s: no X.509 root", ErrBadBundle, td)
	}
	for _, c := range roots {
		if !c.IsCA {
			return fmt.Errorf("%w: %s: certificate %q is not a CA", ErrBadBundle, td, c.Subject)
		}
		if now.After(c.NotAfter) {
			return fmt.Errorf("%w: %s: root %q expired at %s", ErrBadBundle, td, c.Subject, c.NotAfter.UTC().Format(time.RFC3339))
		}
		if named, ok := rootTrustDomain(c); ok && named != td {
			return fmt.Errorf("%w: %s: root %q is the root of %s", ErrBadBundle, td, c.Subject, named)
		}
	}
	return nil
}

// rootTrustDomain returns the trust domain a root names by its one spiffe://<domain> URI
// SAN with no path (NewRoot writes it), if it has one.
func rootTrustDomain(c *x509.Certificate) (mesh.TrustDomain, bool) {
	if len(c.URIs) != 1 || c.URIs[0].Scheme != "spiffe" || c.URIs[0].Path != "" {
		return "", false
	}
	td, err := mesh.ParseTrustDomain(c.URIs[0].Host)
	return td, err == nil
}
