package trust

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"time"
)

// clockSkew is how far every certificate this package mints is backdated: NotBefore is
// clockSkew before the moment of issue, so a peer whose clock runs up to that much behind
// the CA's (another cluster, another host) does not see a fresh certificate as "not yet
// valid". It is one minute because a workload uses its leaf the moment it arrives, in any
// cluster of the mesh, and NTP keeps real clusters well within it; a longer allowance
// would only widen the window in which a certificate is valid before it was made. The
// validity still runs from the moment of issue: NotAfter is now + ttl.
const clockSkew = time.Minute

// newKey generates the key of every certificate this package mints itself (roots,
// intermediates, serving certificates): ECDSA P-256, what Istio's CA uses by default.
func newKey() (*ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("trust: generate key: %w", err)
	}
	return key, nil
}

// issue is the one place this package calls x509.CreateCertificate: roots,
// intermediates, workload leaves and serving certificates all pass through it, so the
// serial numbers and the validity window are made one way.
//
// tmpl carries the subject, names, usages and constraints; issue fills in SerialNumber,
// NotBefore (now - clockSkew) and NotAfter (now + ttl, cut to the issuer's own NotAfter:
// nothing outlives the CA that signed it). pub is the subject's public key. issuer is the
// signing CA; nil makes tmpl self-signed with selfKey (a root), in which case selfKey
// must be the private half of pub. The returned certificate is parsed back from the DER,
// so its Raw is what was signed.
func issue(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration, issuer *Authority, selfKey crypto.Signer) (*x509.Certificate, error) {
	der, err := issueDER(tmpl, pub, ttl, issuer, selfKey)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// issueDER is issue without parsing the result back: the DER as signed. Workload leaves
// are only PEM-encoded and sent, so the CSR path skips the parse (a tenth of its time).
func issueDER(tmpl *x509.Certificate, pub crypto.PublicKey, ttl time.Duration, issuer *Authority, selfKey crypto.Signer) ([]byte, error) {
	sn, err := serialNumber()
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	now := time.Now()
	tmpl.SerialNumber = sn
	tmpl.NotBefore = now.Add(-clockSkew)
	tmpl.NotAfter = now.Add(ttl)
	parent, key := tmpl, selfKey
	if issuer != nil {
		parent, key = issuer.Cert, issuer.Key
		if tmpl.NotAfter.After(issuer.Cert.NotAfter) {
			tmpl.NotAfter = issuer.Cert.NotAfter
		}
	}
	return x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
}

// serialNumber is a random 127-bit serial: positive, at most 20 octets (RFC 5280 §4.1.2.2)
// and unguessable, so two CAs of a mesh never collide.
func serialNumber() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}
