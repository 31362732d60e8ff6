package proc

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStartStopAndExitError(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "sleeper.log")
	// A shell that forks a child: Stop must end the whole process group.
	p, err := Start("sleeper", "/bin/sh", []string{"-c", "echo started; sleep 300 & wait"}, log, false, []string{"MARK=isthmus-proc-test"})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(LogTail(log, 5), "started") {
		if time.Now().After(deadline) {
			t.Fatal("no output in the log")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if p.Exited() || !PIDMatches(p.PID(), "sleep") {
		t.Fatal("the process is not running")
	}
	p.Stop(2 * time.Second)
	if !p.Exited() {
		t.Fatal("Stop returned before the process exited")
	}
	if err := p.ExitError(); !strings.Contains(err.Error(), "sleeper") || !strings.Contains(err.Error(), "started") {
		t.Fatalf("ExitError lacks the name or the log tail: %v", err)
	}

	q, err := Start("failing", "/bin/sh", []string{"-c", "echo boom >&2; exit 3"}, filepath.Join(dir, "failing.log"), false, nil)
	if err != nil {
		t.Fatal(err)
	}
	<-q.Done()
	if err := q.ExitError(); !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("ExitError: %v", err)
	}
	if _, err := Start("missing", filepath.Join(dir, "no-such-binary"), nil, filepath.Join(dir, "m.log"), false, nil); err == nil {
		t.Fatal("started a binary that does not exist")
	}
}

func TestStopPIDOnlyHitsTheMarkedProcess(t *testing.T) {
	dir := t.TempDir()
	p, err := Start("detached", "/bin/sleep", []string{"300"}, filepath.Join(dir, "d.log"), true, nil)
	if err != nil {
		t.Fatal(err)
	}
	StopPID(p.PID(), "not-in-its-command-line", time.Second)
	if p.Exited() {
		t.Fatal("StopPID stopped a process whose command line lacks the marker")
	}
	StopPID(p.PID(), "300", 2*time.Second)
	select {
	case <-p.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("StopPID did not stop the marked process")
	}
	if PIDMatches(os.Getpid(), "no-such-marker-anywhere") {
		t.Fatal("PIDMatches matched a marker that is not there")
	}
}
