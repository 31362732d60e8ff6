package federation

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// TokenPrefix starts every peering token, so that a token pasted into the wrong place is
// recognisable and a future format can be told apart.
const TokenPrefix = "isthmus-peering-v1."

// secretLen is the length of a token's one-time secret.
const secretLen = 32

// maxTokenLen bounds what ParseToken reads: a token is a few hundred bytes.
const maxTokenLen = 16 << 10

// Token is what an accepting mesh hands to a dialing mesh: how to reach it, who it is,
// and a one-time secret. Its wire form (Encode, ParseToken) is documented in
// docs/federation.md.
type Token struct {
	// ID names the peering on the accepting side; the dialer quotes it at establish.
	ID string `json:"id"`
	// Peer is the name the acceptor gave the dialing mesh.
	Peer string `json:"peer"`
	// Mesh and TrustDomain are the acceptor's; the dialer refuses an endpoint that proves
	// anything else.
	Mesh        mesh.MeshID      `json:"mesh"`
	TrustDomain mesh.TrustDomain `json:"trustDomain"`
	// Addresses are the acceptor's federation endpoints (host:port), tried in order.
	Addresses []string `json:"addresses"`
	// BundleFingerprint is BundleFingerprint of the acceptor's trust-bundle roots, hex.
	BundleFingerprint string `json:"bundleFingerprint"`
	// BundleEndpoint is the acceptor's SPIFFE bundle endpoint URL; optional.
	BundleEndpoint string `json:"bundleEndpoint,omitempty"`
	// Secret is the one-time secret (32 bytes).
	Secret []byte `json:"secret"`
	// ExpiresAt is when the acceptor stops accepting the secret.
	ExpiresAt time.Time `json:"expiresAt"`
}

// ErrBadToken is wrapped by every ParseToken and Token.Validate refusal.
var ErrBadToken = errors.New("bad peering token")

// BundleFingerprint returns the hex SHA-256 over the sorted DER of roots: the same roots
// in any order have the same fingerprint.
func BundleFingerprint(roots []*x509.Certificate) string {
	ders := make([][]byte, 0, len(roots))
	for _, r := range roots {
		ders = append(ders, r.Raw)
	}
	slices.SortFunc(ders, bytes.Compare)
	h := sha256.New()
	for _, d := range ders {
		var n [8]byte
		for i := range 8 {
			n[i] = byte(uint64(len(d)) >> (56 - 8*i))
		}
		h.Write(n[:])
		h.Write(d)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// NewSecret returns a fresh one-time secret.
func NewSecret() ([]byte, error) {
	s := make([]byte, secretLen)
	if _, err := io.ReadFull(rand.Reader, s); err != nil {
		return nil, fmt.Errorf("federation: token secret: %w", err)
	}
	return s, nil
}

// NewPeeringID returns a fresh random peering ID (16 hex digits).
func NewPeeringID() (string, error) {
	b := make([]byte, 8)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		return "", fmt.Errorf("federation: peering ID: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// Validate checks every field of the token on its own (not its expiry: that is the
// acceptor's to judge, with its clock).
func (t *Token) Validate() error {
	if err := checkPeeringID(t.ID); err != nil {
		return fmt.Errorf("%w: %w", ErrBadToken, err)
	}
	if _, err := ParsePeerName(t.Peer); err != nil {
		return fmt.Errorf("%w: peer: %w", ErrBadToken, err)
	}
	if _, err := mesh.ParseMeshID(string(t.Mesh)); err != nil {
		return fmt.Errorf("%w: mesh: %w", ErrBadToken, err)
	}
	if _, err := mesh.ParseTrustDomain(string(t.TrustDomain)); err != nil {
		return fmt.Errorf("%w: trust domain: %w", ErrBadToken, err)
	}
	if len(t.Addresses) == 0 || len(t.Addresses) > 16 {
		return fmt.Errorf("%w: %d addresses, want 1 to 16", ErrBadToken, len(t.Addresses))
	}
	for _, a := range t.Addresses {
		if err := checkHostPort(a); err != nil {
			return fmt.Errorf("%w: address %q: %w", ErrBadToken, a, err)
		}
	}
	if fp, err := hex.DecodeString(t.BundleFingerprint); err != nil || len(fp) != sha256.Size {
		return fmt.Errorf("%w: bundle fingerprint %q is not a hex SHA-256", ErrBadToken, t.BundleFingerprint)
	}
	if t.BundleEndpoint != "" && !strings.HasPrefix(t.BundleEndpoint, "https://") {
		return fmt.Errorf("%w: bundle endpoint %q is not an https URL", ErrBadToken, t.BundleEndpoint)
	}
	if len(t.Secret) != secretLen {
		return fmt.Errorf("%w: secret is %d bytes, want %d", ErrBadToken, len(t.Secret), secretLen)
	}
	if t.ExpiresAt.IsZero() {
		return fmt.Errorf("%w: no expiry", ErrBadToken)
	}
	return nil
}

// Encode returns the token's wire form: TokenPrefix, then base64url (no padding) of the
// JSON body followed by its HMAC-SHA256 under the secret.
func (t *Token) Encode() (string, error) {
	if err := t.Validate(); err != nil {
		return "", err
	}
	body, err := json.Marshal(t)
	if err != nil {
		return "", fmt.Errorf("federation: encode token: %w", err)
	}
	m := hmac.New(sha256.New, t.Secret)
	m.Write(body)
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(append(body, m.Sum(nil)...)), nil
}

// ParseToken decodes and checks a token (not its expiry). Surrounding white space is
// ignored; anything else that is not exactly what Encode makes is refused with an error
// wrapping ErrBadToken that says what is wrong.
func ParseToken(s string) (*Token, error) {
	s = strings.TrimSpace(s)
	if len(s) > maxTokenLen {
		return nil, fmt.Errorf("%w: %d bytes, longer than %d", ErrBadToken, len(s), maxTokenLen)
	}
	rest, ok := strings.CutPrefix(s, TokenPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: does not start with %q", ErrBadToken, TokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil {
		return nil, fmt.Errorf("%w: not base64url (truncated or edited?): %w", ErrBadToken, err)
	}
	if len(raw) <= sha256.Size {
		return nil, fmt.Errorf("%w: %d bytes, too short (truncated?)", ErrBadToken, len(raw))
	}
	body, tag := raw[:len(raw)-sha256.Size], raw[len(raw)-sha256.Size:]
	var t Token
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&t); err != nil {
		return nil, fmt.Errorf("%w: body (truncated or edited?): %w", ErrBadToken, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: body: data after the JSON object", ErrBadToken)
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	m := hmac.New(sha256.New, t.Secret)
	m.Write(body)
	if !hmac.Equal(m.Sum(nil), tag) {
		return nil, fmt.Errorf("%w: integrity check failed (edited or truncated)", ErrBadToken)
	}
	return &t, nil
}

// SecretHash is what an acceptor keeps of a token's secret.
func SecretHash(secret []byte) string {
	h := sha256.Sum256(secret)
	return hex.EncodeToString(h[:])
}

// ParsePeerName checks a peering's name: a DNS label (it becomes part of imported
// hostnames and object names).
func ParsePeerName(s string) (string, error) {
	if s == "" || len(s) > 63 {
		return "", fmt.Errorf("peer name %q: want 1 to 63 characters", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(s)-1
		if !ok {
			return "", fmt.Errorf("peer name %q: want a DNS label (lower-case letters, digits, inner '-')", s)
		}
	}
	return s, nil
}

func checkPeeringID(id string) error {
	if b, err := hex.DecodeString(id); err != nil || len(b) != 8 {
		return fmt.Errorf("peering ID %q: want 16 hex digits", id)
	}
	return nil
}

func checkHostPort(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return err
	}
	if host == "" {
		return errors.New("no host")
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("port %q", port)
	}
	return nil
}
