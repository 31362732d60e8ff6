package eastwest

import "sync/atomic"

// maxIdleWorkers bounds the goroutines kept waiting for the next connection.
const maxIdleWorkers = 64

// workers runs functions on goroutines that outlive them: a goroutine that finished one
// waits for the next instead of exiting, up to maxIdleWorkers of them. A new connection
// then starts on a goroutine whose stack already grew through the accept, dial and
// relay path, instead of growing (copying) a fresh one each time, which cost about a
// tenth of the gateway's CPU per new connection.
type workers struct {
	work chan func() // unbuffered: a send succeeds only into a waiting worker
	quit chan struct{}
	idle atomic.Int32
}

func newWorkers() *workers {
	return &workers{work: make(chan func()), quit: make(chan struct{})}
}

// goRun runs f on an idle worker, or on a new goroutine when none waits.
func (w *workers) goRun(f func()) {
	select {
	case w.work <- f:
	default:
		go w.loop(f)
	}
}

func (w *workers) loop(f func()) {
	for {
		f()
		if w.idle.Add(1) > maxIdleWorkers {
			w.idle.Add(-1)
			return
		}
		select {
		case f = <-w.work:
			w.idle.Add(-1)
		case <-w.quit:
			w.idle.Add(-1)
			return
		}
	}
}

// stop makes the idle workers exit; goRun keeps working (on new goroutines).
func (w *workers) stop() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
}
