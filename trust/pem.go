package trust

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
)

// The PEM block types this package reads and writes.
const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY" // PKCS #8, what this package writes
	pemCSR         = "CERTIFICATE REQUEST"
)

// certPEM encodes c as one PEM CERTIFICATE block.
func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCertificate, Bytes: c.Raw})
}

// certsPEM encodes certs as concatenated PEM, in order.
func certsPEM(certs []*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, certPEM(c)...)
	}
	return out
}

// keyPEM encodes key as a PKCS #8 PEM PRIVATE KEY block.
func keyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("trust: encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), nil
}

// csrPEM encodes a DER certificate request as a PEM CERTIFICATE REQUEST block, the form
// Istio's CSR API and cert-manager's CertificateRequest carry.
func csrPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: pemCSR, Bytes: der})
}

// nextCert decodes the first PEM CERTIFICATE block of data, skipping blocks of other
// types, and returns it with the bytes after it. It returns (nil, nil, nil) when data
// holds no further PEM block; a CERTIFICATE block that does not parse is an error, never
// skipped.
func nextCert(data []byte) (*x509.Certificate, []byte, error) {
	for {
		block, rest := pem.Decode(data)
		if block == nil {
			return nil, nil, nil
		}
		if block.Type != pemCertificate {
			data = rest
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		return c, rest, err
	}
}

// parseCerts decodes every PEM CERTIFICATE block of data, in order, skipping blocks of
// other types (a key in the same file). It fails when a certificate does not parse or
// when there is none.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		c, rest, err := nextCert(data)
		if err != nil {
			return nil, err
		}
		if c == nil {
			break
		}
		out = append(out, c)
		data = rest
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return out, nil
}

// parseKey reads a private key in any of the encodings Istio's plug-in CA files are
// found in (PKCS #8, SEC 1 EC, PKCS #1 RSA); the key must be able to sign.
func parseKey(block *pem.Block) (crypto.Signer, error) {
	var k any
	var err error
	switch block.Type {
	case pemPrivateKey:
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

// publicKeysEqual reports whether a and b are the same key; false for a key type
// without an Equal method (none of the standard library's).
func publicKeysEqual(a, b crypto.PublicKey) bool {
	ae, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ae.Equal(b)
}

// pemRest strips the whitespace a PEM encoder leaves after the last block, so that
// what remains is a further block (or garbage) and never just a trailing newline.
func pemRest(b []byte) []byte {
	for len(b) > 0 && (b[0] == '\n' || b[0] == '\r' || b[0] == ' ' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

// Fingerprint is a certificate's SHA-256, hex encoded: how trustz and rotation name roots.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}
