package primary

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// TestLinkHealthObserve replays probe outcomes with their times through the policy.
func TestLinkHealthObserve(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	type probe struct {
		start, end float64 // seconds
		answered   bool
		want       linkVerdict
	}
	for _, tc := range []struct {
		name   string
		probes []probe
	}{
		{"one lost probe is noise", []probe{
			{0, 0.01, false, linkNoise}, {2, 2.01, true, linkUp}, {4, 4.01, false, linkNoise},
		}},
		{"refused at once: stale 8 s after the first failed probe began", []probe{
			{0, 0.01, false, linkNoise}, {2, 2.01, false, linkDown}, {4, 4.01, false, linkDown},
			{6, 6.01, false, linkDown}, {8, 8.01, false, linkStale}, {10, 10.01, false, linkStale},
		}},
		// A blackholed API server: every probe lasts its 2 s timeout. The window counts
		// from 0 s, when the first of them began, so the probe that ends at 8 s withdraws.
		// (It used to be counted from the second failure's end minus one interval, 2 s,
		// and withdrew a probe later, at 10 s.)
		{"timing out: the window counts from the first probe's start", []probe{
			{0, 2, false, linkNoise}, {2, 4, false, linkDown}, {4, 6, false, linkDown}, {6, 8, false, linkStale},
		}},
		// Probes of 1 s timeout every 200 ms: ticks are dropped while one runs.
		{"ticks dropped while probes time out", []probe{
			{0, 1, false, linkNoise}, {1, 2, false, linkDown}, {2, 3, false, linkDown}, {7, 8, false, linkStale},
		}},
		{"an answer resets the count", []probe{
			{0, 0.01, false, linkNoise}, {2, 2.01, false, linkDown}, {6, 6.01, true, linkUp},
			{8, 8.01, false, linkNoise}, {10, 10.01, false, linkDown}, {16, 16.01, false, linkStale},
		}},
	} {
		h := linkHealth{window: 8 * time.Second}
		for i, p := range tc.probes {
			if got := h.observe(at(p.start), at(p.end), p.answered); got != p.want {
				t.Errorf("%s: probe %d (%.2fs–%.2fs, answered %v): verdict %d, want %d", tc.name, i, p.start, p.end, p.answered, got, p.want)
			}
		}
	}
}

// fakeReadyz is an API server whose /readyz answers or not, recording when it first
// stopped answering.
type fakeReadyz struct {
	mu        sync.Mutex
	down      bool
	firstFail time.Time
}

func (f *fakeReadyz) check(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.down {
		return nil
	}
	if f.firstFail.IsZero() {
		f.firstFail = time.Now()
	}
	return errors.New("connection refused")
}

func (f *fakeReadyz) set(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down, f.firstFail = down, time.Time{}
}

func (f *fakeReadyz) failedSince() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.firstFail
}

// TestWatcherWithdrawsAfterTheWindowAndRepublishes runs a cluster watcher over a fake
// cluster whose API server stops answering its probe: the endpoints stay for the window,
// go after it, cannot be refilled by a publish while withdrawn, and come back when the
// API server answers again.
func TestWatcherWithdrawsAfterTheWindowAndRepublishes(t *testing.T) {
	client := fake.NewClientset(
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
			Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}}},
	)
	reg := NewRegistry()
	const window = 400 * time.Millisecond
	w := newClusterWatcher("c2", "secret istio-system/c2", client, reg, watcherConfig{
		SyncTimeout: 10 * time.Second, StaleWindow: window, ProbeInterval: 20 * time.Millisecond,
		Domain: "cluster.local", TrustDomain: "cluster.local", SystemNamespace: "istio-system",
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	api := &fakeReadyz{}
	w.readyz = api.check
	w.start()
	w.enable()
	defer w.stop()
	host := mesh.Hostname("echo.demo.svc.cluster.local")
	published := func() bool {
		d := reg.Shard(w.shard)
		return d != nil && d.Services[host] != nil
	}
	waitFor := func(what string, cond func() bool) time.Time {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 20 s (status %+v)", what, w.Status())
			}
		}
		return time.Now()
	}
	waitFor("echo published", published)

	api.set(true)
	gone := waitFor("endpoints withdrawn", func() bool { return reg.Shard(w.shard) == nil })
	if since := api.failedSince(); gone.Sub(since) < window-20*time.Millisecond {
		t.Fatalf("withdrawn %s after the first failed probe; the stale window is %s", gone.Sub(since), window)
	}
	if st := w.Status(); st.State != StateUnreachable || !st.Withdrawn {
		t.Fatalf("status %+v; want unreachable and withdrawn", st)
	}
	// A publish while withdrawn (the first sync completing between two failed probes)
	// must leave the shard empty.
	w.publishAll()
	if reg.Shard(w.shard) != nil {
		t.Fatal("a publish refilled the shard of a withdrawn cluster")
	}

	api.set(false)
	waitFor("republished once the API server answers", published)
	if st := w.Status(); st.State != StateSynced || st.Withdrawn {
		t.Fatalf("status %+v; want synced, not withdrawn", st)
	}
}
