package buildlock

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
)

// pollInterval is how often a waiting process tries the lock again. flock has no
// cancellable blocking form, so waiting is polling; half a second is nothing next to a
// build of minutes.
const pollInterval = 500 * time.Millisecond

// Acquire takes an exclusive flock on path (created when missing), waiting for another
// holder until ctx ends. When it has to wait, it says so once on progress (nil: silent),
// naming what: "waiting for another process that is building <what> (lock <path>)". The
// returned function releases the lock; the kernel releases it too if the process dies,
// so a crashed build never leaves the cache locked.
func Acquire(ctx context.Context, path, what string, progress io.Writer) (release func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("build lock %s: %w", path, err)
	}
	said := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("build lock %s: %w", path, err)
		}
		if !said && progress != nil {
			fmt.Fprintf(progress, "waiting for another process that is building %s (lock %s)\n", what, path)
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for build lock %s: %w", path, ctx.Err())
		case <-time.After(pollInterval):
		}
	}
}
