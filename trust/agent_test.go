package trust

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func TestRetryDelay(t *testing.T) {
	now := time.Now()
	valid := &x509.Certificate{NotAfter: now.Add(3 * time.Second)}
	expired := &x509.Certificate{NotAfter: now.Add(-time.Second)}
	for _, tc := range []struct {
		name    string
		backoff time.Duration
		cur     *x509.Certificate
		want    time.Duration
	}{
		{"valid, backoff before expiry", 2 * time.Second, valid, 2 * time.Second},
		{"valid, backoff past expiry: retry at expiry", 8 * time.Second, valid, 3 * time.Second},
		{"valid, expiry in a moment: at expiry", 8 * time.Second, &x509.Certificate{NotAfter: now.Add(time.Millisecond)}, time.Millisecond},
		{"expired, first backoff step", time.Second, expired, time.Second},
		{"expired, long backoff: at most noCertRetry", time.Minute, expired, noCertRetry},
		{"expired, short backoff", 2 * time.Second, expired, 2 * time.Second},
		{"expired exactly now", 32 * time.Second, &x509.Certificate{NotAfter: now}, noCertRetry},
		{"no certificate yet", time.Minute, nil, noCertRetry},
	} {
		if got := retryDelay(now, tc.backoff, tc.cur); got != tc.want {
			t.Errorf("%s: retryDelay = %s, want %s", tc.name, got, tc.want)
		}
	}
}

// flakyCA issues one short certificate, then refuses every request as a CA that went
// away does, recording when each request came.
type flakyCA struct {
	ca  *Authority
	ttl time.Duration

	mu    sync.Mutex
	calls []time.Time
}

func (f *flakyCA) CreateCertificate(_ context.Context, req *pb.IstioCertificateRequest, _ ...grpc.CallOption) (*pb.IstioCertificateResponse, error) {
	f.mu.Lock()
	f.calls = append(f.calls, time.Now())
	first := len(f.calls) == 1
	f.mu.Unlock()
	if !first {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	b, _ := pem.Decode([]byte(req.GetCsr()))
	if b == nil {
		return nil, errors.New("no CSR")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, err
	}
	chain, err := f.ca.Sign(context.Background(), csr, mesh.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"}, f.ttl)
	if err != nil {
		return nil, err
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

func (f *flakyCA) callTimes() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.calls...)
}

// TestAgentDoesNotFloodTheCAOnceItsCertificateExpired: the CA issues a short certificate
// and then is gone. Retries go on past the expiry, a second or more apart. (The retry
// used to be capped at the expiry; once that was in the past the agent retried without
// waiting, thousands of requests a second, in a fault scenario where the primary was
// killed for longer than a workload certificate lives.)
func TestAgentDoesNotFloodTheCAOnceItsCertificateExpired(t *testing.T) {
	root, err := NewRoot("cluster.local", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ca := &flakyCA{ca: root, ttl: 1200 * time.Millisecond}
	agent, err := NewAgent(AgentConfig{CA: ca, Token: func() (string, error) { return "token", nil }, Dir: t.TempDir(), TTL: ca.ttl})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- agent.Run(ctx) }()
	defer func() { cancel(); <-done }()

	// Issue, a renewal at half-life (fails), a retry at expiry (fails), then two retries
	// without a valid certificate.
	const want = 5
	deadline := time.Now().Add(20 * time.Second)
	for len(ca.callTimes()) < want {
		if time.Now().After(deadline) {
			t.Fatalf("%d request(s) in 20 s; the agent stopped retrying", len(ca.callTimes()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	calls := ca.callTimes()
	cur := agent.Current()
	if cur == nil {
		t.Fatal("no certificate from the first request")
	}
	// The retry at expiry may follow the last one before it closely; from then on, with
	// the certificate expired, every retry waits.
	after := 0
	for i := 1; i < len(calls); i++ {
		if calls[i-1].Before(cur.NotAfter) {
			continue
		}
		after++
		if gap := calls[i].Sub(calls[i-1]); gap < 900*time.Millisecond {
			t.Fatalf("request %d came %s after the previous one, with the certificate expired; retries must wait (calls %v)", i+1, gap, calls)
		}
	}
	if after == 0 {
		t.Fatalf("no request after the certificate expired at %s (calls %v)", cur.NotAfter, calls)
	}
}
