package trust

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// authority returns the current signing authority.
func (s *Server) authority() *Authority { return s.auth.Load() }

// SetAuthority swaps the signing authority: requests already signing finish with the old
// one, later ones use a. The trust domain must stay the same.
func (s *Server) SetAuthority(a *Authority) error {
	if a == nil {
		return fmt.Errorf("trust: CA server: nil authority")
	}
	if cur := s.authority(); cur.TrustDomain != a.TrustDomain {
		return fmt.Errorf("trust: CA server: new authority is for %s, the server signs for %s", a.TrustDomain, cur.TrustDomain)
	}
	s.auth.Store(a)
	return nil
}

// ReloadDir keeps s signing with the plug-in CA in dir until ctx ends: every interval it
// reads the files and, when they changed and form a valid CA, swaps them in. A broken or
// half-written directory is reported through onError and the current CA stays.
func ReloadDir(ctx context.Context, s *Server, dir string, interval time.Duration, onError func(error)) error {
	// Nothing is assumed about what the server was started with: the first tick reads the
	// directory as it is then (a change made before this goroutine ran still counts).
	last := ""
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
		h := dirHash(dir)
		if h == last {
			continue
		}
		a, err := LoadDir(dir)
		if err == nil {
			err = s.SetAuthority(a)
		}
		last = h // a broken version is reported once, and tried again when the files change
		if err != nil && onError != nil {
			onError(fmt.Errorf("trust: reload %s: %w", dir, err))
		}
	}
}

// dirHash fingerprints the plug-in CA files in dir.
func dirHash(dir string) string {
	h := sha256.New()
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		data, _ := os.ReadFile(filepath.Join(dir, name))
		h.Write([]byte(name))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Fingerprint is a certificate's SHA-256, hex encoded: how trustz and rotation name roots.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// TrustStatus is what a CA serves right now (/debug/trustz).
type TrustStatus struct {
	TrustDomain string `json:"trustDomain"`
	// Signer is the signing certificate's subject, serial and expiry.
	Signer         string    `json:"signer"`
	SignerNotAfter time.Time `json:"signerNotAfter"`
	// Root is the fingerprint of the root the signer chains to; Anchors of every root
	// handed to workloads.
	Root    string   `json:"root"`
	Anchors []string `json:"anchors"`
}

// Status returns what the server signs with and hands out.
func (s *Server) Status() TrustStatus {
	a := s.authority()
	st := TrustStatus{TrustDomain: string(a.TrustDomain), Signer: fmt.Sprintf("%s (serial %s)", a.Cert.Subject, a.Cert.SerialNumber),
		SignerNotAfter: a.Cert.NotAfter, Root: Fingerprint(a.Root.Raw)}
	for _, c := range a.TrustAnchors() {
		st.Anchors = append(st.Anchors, Fingerprint(c.Raw))
	}
	return st
}

// DebugHandler serves Status as JSON (mounted at /debug/trustz).
func (s *Server) DebugHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetIndent("", "  ")
		enc.Encode(s.Status())
		w.Header().Set("Content-Type", "application/json")
		w.Write(b.Bytes())
	})
}
