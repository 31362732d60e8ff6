package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// lockEngine takes the host-wide engine lock, waiting (and saying so once) while another
// process runs its engine.
func lockEngine(ctx context.Context, say func(string)) (func(), error) {
	if err := os.MkdirAll(runRoot, 0o700); err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	path := runRoot + ".lock"
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("engine: lock %s: %w", path, err)
	}
	said := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("engine: lock %s: %w", path, err)
		}
		if !said {
			say("container engine: waiting for another process's isthmus dockerd to stop (lock " + path + ")")
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// stopStale stops a dockerd of ours that a process which died left running (the lock is
// ours, so nobody uses it).
func stopStale(host string, say func(string)) error {
	b, err := os.ReadFile(filepath.Join(runRoot, "dockerd.pid"))
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 || syscall.Kill(pid, 0) != nil {
		return nil
	}
	say(fmt.Sprintf("container engine: stopping dockerd %d left by an earlier run", pid))
	syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 100; i++ {
		if syscall.Kill(pid, 0) != nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	return nil
}
