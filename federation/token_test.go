package federation

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strings"
	"testing"
	"time"
)

func testToken(t testing.TB) *Token {
	t.Helper()
	secret, err := NewSecret()
	if err != nil {
		t.Fatal(err)
	}
	return &Token{
		ID: "0123456789abcdef", Peer: "mesh-b", Mesh: "mesh-a", TrustDomain: "a.example",
		Addresses:         []string{"127.0.0.1:15443", "[::1]:15443"},
		BundleFingerprint: strings.Repeat("ab", 32),
		BundleEndpoint:    "https://127.0.0.1:8443",
		Secret:            secret,
		ExpiresAt:         time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC),
	}
}

func TestTokenRoundTrip(t *testing.T) {
	tok := testToken(t)
	s, err := tok.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseToken("  " + s + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != tok.ID || got.Peer != tok.Peer || !got.ExpiresAt.Equal(tok.ExpiresAt) || string(got.Secret) != string(tok.Secret) || len(got.Addresses) != 2 {
		t.Fatalf("round trip: got %+v, want %+v", got, tok)
	}
}

// TestTokenRefusals covers truncated, edited, forged and malformed tokens: each is refused
// with ErrBadToken and a message that names the problem.
func TestTokenRefusals(t *testing.T) {
	tok := testToken(t)
	good, err := tok.Encode()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(good, TokenPrefix))
	body := raw[:len(raw)-sha256.Size]
	reseal := func(body, key []byte) string {
		m := hmac.New(sha256.New, key)
		m.Write(body)
		return TokenPrefix + base64.RawURLEncoding.EncodeToString(append(append([]byte{}, body...), m.Sum(nil)...))
	}
	edited := strings.Replace(string(body), `"mesh":"mesh-a"`, `"mesh":"mesh-x"`, 1)
	cases := []struct {
		name, token, want string
	}{
		{"empty", "", "does not start with"},
		{"other prefix", "consul-peering." + strings.TrimPrefix(good, TokenPrefix), "does not start with"},
		{"truncated", good[:len(good)-7], "truncated"},
		{"truncated by 4", good[:len(good)-4], "truncated"},
		{"cut in half", good[:len(good)/2], "body"},
		{"not base64", good + "!", "not base64url"},
		{"too short", TokenPrefix + "AAAA", "too short"},
		{"edited body", TokenPrefix + base64.RawURLEncoding.EncodeToString(append([]byte(edited), raw[len(raw)-sha256.Size:]...)), "integrity"},
		{"forged tag", reseal(body, []byte("not the secret, 32 bytes long!!!")), "integrity"},
		{"unknown field", reseal([]byte(strings.Replace(string(body), "{", `{"admin":true,`, 1)), tok.Secret), "unknown field"},
		{"trailing data", reseal(append(append([]byte{}, body...), []byte(" {}")...), tok.Secret), "after the JSON"},
		{"bad address", reseal([]byte(strings.Replace(string(body), "127.0.0.1:15443", "127.0.0.1", 1)), tok.Secret), "address"},
		{"bad fingerprint", reseal([]byte(strings.Replace(string(body), strings.Repeat("ab", 32), "abcd", 1)), tok.Secret), "fingerprint"},
		{"bad peer", reseal([]byte(strings.Replace(string(body), `"peer":"mesh-b"`, `"peer":"Mesh_B"`, 1)), tok.Secret), "peer name"},
		{"huge", TokenPrefix + strings.Repeat("A", maxTokenLen), "longer than"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseToken(c.token)
			if !errors.Is(err, ErrBadToken) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("ParseToken: %v, want ErrBadToken mentioning %q", err, c.want)
			}
		})
	}
}

func TestBundleFingerprintIgnoresOrder(t *testing.T) {
	a, b := testRoot(t, "a.example"), testRoot(t, "b.example")
	if BundleFingerprint(roots(a, b)) != BundleFingerprint(roots(b, a)) {
		t.Fatal("fingerprint depends on order")
	}
	if BundleFingerprint(roots(a)) == BundleFingerprint(roots(a, b)) {
		t.Fatal("fingerprint ignores a root")
	}
}

// FuzzToken feeds arbitrary strings to ParseToken: never a panic, and whatever parses
// encodes back to a token that parses to the same fields.
func FuzzToken(f *testing.F) {
	tok := testToken(f)
	good, _ := tok.Encode()
	f.Add(good)
	f.Add(good[:len(good)-3])
	f.Add(TokenPrefix)
	f.Add(TokenPrefix + "e30")
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseToken(s)
		if err != nil {
			if !errors.Is(err, ErrBadToken) {
				t.Fatalf("error does not wrap ErrBadToken: %v", err)
			}
			return
		}
		again, err := got.Encode()
		if err != nil {
			t.Fatalf("parsed token does not encode: %v", err)
		}
		back, err := ParseToken(again)
		if err != nil || back.ID != got.ID || back.Peer != got.Peer || !back.ExpiresAt.Equal(got.ExpiresAt) {
			t.Fatalf("re-encoded token: %v %+v vs %+v", err, back, got)
		}
	})
}
