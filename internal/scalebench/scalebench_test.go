package scalebench

import (
	"context"
	"os"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	ServeIfChild()
	os.Exit(m.Run())
}

// TestShortRun runs small cases end to end (child process, SotW and delta clients,
// isolated changes), so that the harness `make bench-scale` runs cannot rot. It checks
// that every subscribed client received every change and that the figures are sane, not
// how fast anything was.
func TestShortRun(t *testing.T) {
	for _, delta := range []bool{false, true} {
		c := Case{Shape: Shape{Clusters: 10, Services: 10, Endpoints: 5, Debounce: 20 * time.Millisecond},
			Clients: 150, Subscribe: 3, Delta: delta, Changes: 6}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		res, err := Run(ctx, c, []string{os.Args[0], "-test.run=^$"}, testWriter{t})
		cancel()
		if err != nil {
			t.Fatalf("delta=%v: %v", delta, err)
		}
		t.Logf("delta=%v: %+v", delta, res)
		if res.Endpoints != 500 || res.Receivers != 45 {
			t.Errorf("delta=%v: %d endpoints, %d receivers per change; want 500 and 45", delta, res.Endpoints, res.Receivers)
		}
		if res.HeapPerEndpoint <= 0 || res.BytesPerChange <= 0 || res.CPUPerChange <= 0 || res.P99 < res.P50 {
			t.Errorf("delta=%v: implausible figures %+v", delta, res)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) { w.t.Log(string(b)); return len(b), nil }
