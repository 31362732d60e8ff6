package trust

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Files an Agent writes, in the layout grpc-go's file_watcher certificate provider reads
// (certificate_file, private_key_file, ca_certificate_file).
const (
	AgentCertFile = "cert-chain.pem" // leaf then intermediates
	AgentKeyFile  = "key.pem"
	AgentRootFile = "root-cert.pem"
)

// AgentConfig configures an Agent.
type AgentConfig struct {
	// CA is a client of the CSR API; required.
	CA pb.IstioCertificateServiceClient
	// Token returns the workload's service-account token (audience istio-ca) for each
	// request, re-read every time because projected tokens rotate; required.
	Token func() (string, error)
	// Cluster is sent as the clusterid metadata so the CA reviews the token in the
	// workload's own cluster; empty means the CA's cluster.
	Cluster mesh.ClusterID
	// Dir receives the files; required.
	Dir string
	// Identity, when set, is named in each CSR as its URI SAN, as Istio's agents do; CAs
	// that sign CSRs as they are (cert-manager) need it. The CA still checks it is the
	// caller's.
	Identity mesh.Identity
	// TTL is the validity to ask for; default 24 h.
	TTL time.Duration
	// Log receives renewals and failures; nil discards.
	Log *slog.Logger
	// OnIssue, when set, is called after each new certificate is on disk (an SDS server
	// pushes it to Envoy from here). It must not block for long.
	OnIssue func(Issued)
}

// Issued is a certificate an Agent obtained, as written to its files.
type Issued struct {
	Leaf     *x509.Certificate
	ChainPEM []byte // leaf then intermediates
	KeyPEM   []byte // PKCS#8
	RootPEM  []byte // the root that ends the chain
}

// Agent keeps a workload's certificate current on disk: it requests one at start, then
// renews at half of each certificate's life, retrying with backoff on failure while the
// current certificate stays in place.
type Agent struct {
	cfg AgentConfig

	mu sync.Mutex
	// current is the certificate on disk; guarded by mu.
	current *x509.Certificate
	// pair is current's key pair as loaded from disk, for KeyPair; guarded by mu.
	pair *tls.Certificate
}

// NewAgent validates cfg.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.CA == nil || cfg.Token == nil || cfg.Dir == "" {
		return nil, errors.New("trust: agent: CA, Token and Dir are required")
	}
	if cfg.TTL == 0 {
		cfg.TTL = 24 * time.Hour
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Agent{cfg: cfg}, nil
}

// Current returns the certificate on disk, or nil before the first issuance.
func (a *Agent) Current() *x509.Certificate {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.current
}

// KeyPair returns the current certificate and key as TLS serves them, read from Dir once
// per issued certificate (so a renewal is picked up at the next handshake). It fails
// before the first issuance.
func (a *Agent) KeyPair() (*tls.Certificate, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.current == nil {
		return nil, errors.New("trust: agent: no certificate yet")
	}
	if a.pair != nil && a.pair.Leaf != nil && a.pair.Leaf.SerialNumber.Cmp(a.current.SerialNumber) == 0 {
		return a.pair, nil
	}
	c, err := tls.LoadX509KeyPair(filepath.Join(a.cfg.Dir, AgentCertFile), filepath.Join(a.cfg.Dir, AgentKeyFile))
	if err != nil {
		return nil, fmt.Errorf("trust: agent: %w", err)
	}
	a.pair = &c
	return a.pair, nil
}

// Run keeps the certificate current until ctx ends, then returns nil. It never gives up:
// a failed request is retried after a backoff that starts at a second and doubles up to a
// minute, and a success resets it. While the current certificate is valid a retry is never
// later than its expiry; once it has expired (or before the first one) retries are at
// most noCertRetry apart, because the workload cannot serve meanwhile — but never closer
// than a second, so an expired certificate cannot turn the loop into a flood of requests
// against a CA that is down (retryDelay).
func (a *Agent) Run(ctx context.Context) error {
	backoff := time.Second
	for {
		next, err := a.renew(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			wait := retryDelay(time.Now(), backoff, a.Current())
			a.cfg.Log.Warn("certificate request failed; keeping the current one", "err", err, "retry_in", wait)
			next = time.Now().Add(wait)
			backoff = min(backoff*2, time.Minute)
		} else {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(time.Until(next)):
		}
	}
}

// noCertRetry bounds the wait between requests while the workload has no valid
// certificate.
const noCertRetry = 5 * time.Second

// retryDelay is how long the agent waits after a failed request at now, with backoff the
// current step and cur the certificate on disk (nil before the first). A valid
// certificate caps the wait at its expiry, so one more try is made about when it ends
// (a short-lived leaf whose renewal failed must not be left to expire for a whole
// backoff step). Without a valid one the wait is at most noCertRetry and at least a
// second: capping at an expiry already past once made it zero, and the agent retried as
// fast as the CA could refuse, thousands of times a second.
func retryDelay(now time.Time, backoff time.Duration, cur *x509.Certificate) time.Duration {
	if cur != nil && now.Before(cur.NotAfter) {
		return min(backoff, cur.NotAfter.Sub(now))
	}
	return max(min(backoff, noCertRetry), time.Second)
}

// renew requests a certificate, writes it, and returns when the next renewal is due (half
// of its remaining life).
func (a *Agent) renew(ctx context.Context) (time.Time, error) {
	token, err := a.cfg.Token()
	if err != nil {
		return time.Time{}, fmt.Errorf("trust: agent: read token: %w", err)
	}
	// A fresh key for every renewal, so a key never outlives the certificate it was made
	// for; it never leaves this process except into Dir.
	key, err := newKey()
	if err != nil {
		return time.Time{}, err
	}
	tmpl := &x509.CertificateRequest{}
	if !a.cfg.Identity.IsZero() {
		u, err := url.Parse(a.cfg.Identity.String())
		if err != nil {
			return time.Time{}, fmt.Errorf("trust: agent: identity: %w", err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return time.Time{}, err
	}
	md := metadata.Pairs("authorization", "Bearer "+token)
	if a.cfg.Cluster != "" {
		md.Set("clusterid", string(a.cfg.Cluster))
	}
	rctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(ctx, md), 30*time.Second)
	defer cancel()
	resp, err := a.cfg.CA.CreateCertificate(rctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM(der)),
		ValidityDuration: int64(a.cfg.TTL / time.Second),
	})
	if err != nil {
		return time.Time{}, fmt.Errorf("trust: agent: CreateCertificate: %w", err)
	}
	chain := resp.GetCertChain()
	if len(chain) < 2 {
		return time.Time{}, fmt.Errorf("trust: agent: CA returned a chain of %d certificates", len(chain))
	}
	leafBlock, _ := pem.Decode([]byte(chain[0]))
	if leafBlock == nil {
		return time.Time{}, errors.New("trust: agent: CA returned no PEM leaf")
	}
	leaf, err := x509.ParseCertificate(leafBlock.Bytes)
	if err != nil {
		return time.Time{}, fmt.Errorf("trust: agent: leaf: %w", err)
	}
	kp, err := keyPEM(key)
	if err != nil {
		return time.Time{}, err
	}
	files := map[string][]byte{
		AgentCertFile: []byte(strings.Join(chain[:len(chain)-1], "")),
		AgentKeyFile:  kp,
		AgentRootFile: []byte(chain[len(chain)-1]),
	}
	// Key before certificate: a reader that sees the new certificate finds its key.
	for _, name := range []string{AgentKeyFile, AgentRootFile, AgentCertFile} {
		if err := writeAtomic(filepath.Join(a.cfg.Dir, name), files[name]); err != nil {
			return time.Time{}, err
		}
	}
	a.mu.Lock()
	a.current = leaf
	a.mu.Unlock()
	if a.cfg.OnIssue != nil {
		a.cfg.OnIssue(Issued{Leaf: leaf, ChainPEM: files[AgentCertFile], KeyPEM: files[AgentKeyFile], RootPEM: files[AgentRootFile]})
	}
	// Half of the remaining life, counted from now: NotBefore is backdated for clock skew.
	now := time.Now()
	half := now.Add(leaf.NotAfter.Sub(now) / 2)
	a.cfg.Log.Info("certificate issued", "identity", leaf.URIs, "not_after", leaf.NotAfter, "renew_at", half)
	return half, nil
}

// writeAtomic writes data to path through a temporary file and a rename.
func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
