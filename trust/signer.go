package trust

import (
	"context"
	"crypto/x509"
	"errors"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Signer issues a workload certificate for an authenticated identity. The CA server signs
// with its Authority unless ServerConfig.Signer names another backend.
type Signer interface {
	// Sign returns the chain for csr, leaf first, root (or trust anchors) last, in PEM.
	// It wraps ErrWrongIdentity or ErrBadCSR for refusals of the request itself, and
	// ErrSignerRefused when the backend refused or failed it.
	Sign(ctx context.Context, csr *x509.CertificateRequest, id mesh.Identity, ttl time.Duration) ([]string, error)
}

// An Authority signs locally; the CA server uses it through this interface when no other
// backend is configured.
var _ Signer = (*Authority)(nil)

// ErrSignerRefused is wrapped when a signing backend denies or fails a request.
var ErrSignerRefused = errors.New("trust: the signer refused the request")
