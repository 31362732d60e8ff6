package peerbench_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/peerbench"
)

func TestMain(m *testing.M) {
	peerbench.ServeGatewayIfChild() // the gateway relay is this binary, re-executed
	os.Exit(m.Run())
}

// TestShortRound runs the harness in its short mode, one round of a second per phase per
// relay, so that it cannot rot: every relay must route both names, move bulk data,
// answer requests, take new connections and hold the idle ones, and the figures read
// from /proc must be those of a relay that did (at least two descriptors per proxied
// connection, CPU spent). The figures themselves are not judged: CI's machine is shared.
func TestShortRound(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: starts nginx, HAProxy and the gateway and drives them for ~20 s; runs without -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := peerbench.Ensure(ctx, testWriter{t}); err != nil {
		t.Skipf("peers unavailable: %v", err)
	}
	_, straceErr := exec.LookPath("strace")
	res, err := peerbench.Run(ctx, peerbench.Config{Rounds: 1, Duration: time.Second, IdleConns: 200, Progress: testWriter{t},
		Syscalls: straceErr == nil})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("versions %v\n%s\n%s", res.Versions, res.Table(), res.SyscallTable())
	if straceErr != nil {
		t.Logf("no strace, syscall counts not checked: %v", straceErr)
	}
	for relay, phases := range res.Syscalls {
		// accept, connect, a read and a write each way and two closes at the least
		if c := phases["connect"]; c.PerOp() < 6 {
			t.Errorf("%s: %.1f syscalls per new connection counted (%d over %d); strace did not follow the relay", relay, c.PerOp(), c.Total, c.Ops)
		}
	}
	for _, relay := range res.Relays {
		for _, m := range peerbench.Metrics {
			v := res.Values[relay][m]
			if len(v) != 1 {
				t.Errorf("%s %q: %d values, want 1", relay, m, len(v))
				continue
			}
			if v[0] <= 0 && m != peerbench.MRSSPerConn { // RSS may not grow for 200 connections
				t.Errorf("%s %q = %v, want > 0", relay, m, v[0])
			}
		}
		if fds := res.Median(relay, peerbench.MFDsPerConn); fds < 2 {
			t.Errorf("%s holds %.2f descriptors per proxied connection; a relay holds both sockets, so /proc was read from the wrong process", relay, fds)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestHTTPShortRound runs the HTTP comparison for one short round, so that it cannot rot:
// every relay must answer every request with the backend's body over HTTP/1.1 and
// HTTP/2, and the relays' CPU must have been read from their processes. The figures
// themselves are not judged: CI's machine is shared.
func TestHTTPShortRound(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: starts nginx and isthmus proxy and drives them for ~6 s; runs without -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := peerbench.Ensure(ctx, testWriter{t}); err != nil {
		t.Skipf("peers unavailable: %v", err)
	}
	res, err := peerbench.RunHTTP(ctx, peerbench.HTTPConfig{Rounds: 1, Duration: time.Second, Conns: 8, Progress: testWriter{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", res.HTTPTable())
	for _, relay := range res.Relays {
		for _, m := range peerbench.HTTPMetrics {
			v := res.Values[relay][m]
			perCore := m == peerbench.MH1PerCore || m == peerbench.MH2PerCore
			if len(v) != 1 || (v[0] <= 0 && !(perCore && relay == peerbench.Direct)) {
				t.Errorf("%s %q = %v, want one value > 0", relay, m, v)
			}
		}
	}
}
