package trust

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// ReloadDir keeps s signing with the plug-in CA in dir until ctx ends, then returns nil:
// every interval it reads the files and, when they changed and form a valid CA, swaps
// them in (SetAuthority; requests in flight finish with the old CA). A broken or
// half-written directory is reported through onError once per version and the current CA
// stays. It polls rather than watching for events, which also works for a mounted
// Secret, whose files change all at once by a symlink swap.
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

// dirHash fingerprints the plug-in CA files in dir. A file it cannot read counts as empty
// rather than failing: a missing or half-replaced file is then a change like any other,
// and LoadDir reports what is wrong with it.
func dirHash(dir string) string {
	h := sha256.New()
	for _, name := range []string{CACertFile, CAKeyFile, RootCertFile, CertChainFile} {
		data, _ := os.ReadFile(filepath.Join(dir, name))
		h.Write([]byte(name))
		h.Write(data)
	}
	return hex.EncodeToString(h.Sum(nil))
}
