package buildlock

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAcquireWaitsAndCancels: a second holder waits (saying so once), is cancelled by its
// context while the first holds the lock, and gets it once the first releases.
func TestAcquireWaitsAndCancels(t *testing.T) {
	path := filepath.Join(t.TempDir(), ".build.lock")
	release, err := Acquire(context.Background(), path, "things", nil)
	if err != nil {
		t.Fatal(err)
	}
	var progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 1200*time.Millisecond)
	defer cancel()
	if _, err := Acquire(ctx, path, "things", &progress); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second holder while the lock is held: %v", err)
	}
	if got := progress.String(); strings.Count(got, "waiting for another process that is building things") != 1 {
		t.Fatalf("progress: %q", got)
	}
	release()
	again, err := Acquire(context.Background(), path, "things", nil)
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	again()
}
