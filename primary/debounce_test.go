package primary

import (
	"context"
	"sync"
	"testing"
	"time"
)

// fakeClock hands coalescePushes timers whose expiry the test decides. Every timer
// started is announced on started (buffered, so starting one never blocks the loop), so
// the test knows a window has opened before it expires it; nothing here depends on real
// time.
type fakeClock struct {
	started chan fakeTimer
}

type fakeTimer struct {
	d       time.Duration
	fire    chan time.Time
	stopped chan struct{}
}

func (c *fakeClock) after(d time.Duration) (<-chan time.Time, func()) {
	t := fakeTimer{d: d, fire: make(chan time.Time), stopped: make(chan struct{})}
	c.started <- t
	var once sync.Once
	return t.fire, func() { once.Do(func() { close(t.stopped) }) }
}

// debounceRig runs coalescePushes on unbuffered channels: a send returns only once the
// loop has taken the change, so the order of events is the order of the test's lines.
type debounceRig struct {
	t       *testing.T
	changed chan struct{}
	newView chan struct{}
	pushes  chan struct{}
	clock   *fakeClock
	cancel  context.CancelFunc
	done    chan struct{}
}

func newDebounceRig(t *testing.T, window time.Duration) *debounceRig {
	ctx, cancel := context.WithCancel(context.Background())
	r := &debounceRig{t: t, changed: make(chan struct{}), newView: make(chan struct{}), pushes: make(chan struct{}),
		clock: &fakeClock{started: make(chan fakeTimer, 64)}, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		coalescePushes(ctx, r.changed, r.newView, window, r.clock.after, func() {
			select {
			case r.pushes <- struct{}{}:
			case <-ctx.Done():
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Error("coalescePushes did not return after its context ended")
		}
	})
	return r
}

// wait fails the test if the loop does not reach the expected step; the deadline only
// catches a hang, it does not measure anything.
func wait[T any](r *debounceRig, ch <-chan T, what string) T {
	r.t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		r.t.Fatalf("coalescePushes never %s", what)
		panic("unreachable")
	}
}

func (r *debounceRig) push() { r.t.Helper(); wait(r, r.pushes, "pushed") }
func (r *debounceRig) timer() fakeTimer {
	r.t.Helper()
	return wait(r, r.clock.started, "started a window")
}

// change hands the loop one change; it fails if the loop pushes instead of taking it, so
// a change accepted proves the loop was waiting, with no push in between.
func (r *debounceRig) change() {
	r.t.Helper()
	select {
	case r.changed <- struct{}{}:
	case <-r.pushes:
		r.t.Fatal("pushed when it should be waiting")
	case <-time.After(10 * time.Second):
		r.t.Fatal("coalescePushes never took a change")
	}
}

func TestCoalescePushesLoneChangeIsPushedAtOnce(t *testing.T) {
	r := newDebounceRig(t, 100*time.Millisecond)
	r.change()
	r.push() // before any timer has started: no window is waited out
	tm := r.timer()
	if tm.d != 100*time.Millisecond {
		t.Fatalf("window %v, want 100ms", tm.d)
	}
	tm.fire <- time.Time{} // the window passes quietly: no trailing push
	r.change()             // accepted without a push in between, so quiet again
	r.push()               // and this one is a leading edge too
}

func TestCoalescePushesBurstCostsOneTrailingPush(t *testing.T) {
	r := newDebounceRig(t, 100*time.Millisecond)
	r.change()
	r.push()
	tm := r.timer()
	for range 1000 {
		r.change() // no push while the window is open
	}
	r.newView <- struct{}{} // a newly requested view is a change too
	tm.fire <- time.Time{}
	r.push() // one trailing push carries all 1,001
	tm = r.timer()
	tm.fire <- time.Time{} // nothing more arrived: quiet
	r.change()
	r.push()
}

func TestCoalescePushesSteadyStreamIsPushedOncePerWindow(t *testing.T) {
	// The max-delay bound: changes that keep arriving never postpone a push beyond the
	// window that was open when they arrived.
	r := newDebounceRig(t, 100*time.Millisecond)
	r.change()
	r.push()
	for range 5 {
		tm := r.timer()
		r.change()
		r.change()
		tm.fire <- time.Time{}
		r.push()
	}
}

func TestCoalescePushesStopsWithContext(t *testing.T) {
	r := newDebounceRig(t, 100*time.Millisecond)
	r.change()
	r.push()
	tm := r.timer()
	r.change()
	r.cancel()
	wait(r, r.done, "returned")
	select {
	case <-tm.stopped:
	default:
		t.Fatal("open window's timer not stopped")
	}
}
