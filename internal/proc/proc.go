package proc

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// Process is one child process (etcd, kube-apiserver, a primary, ...) with its output in a
// log file.
//
// Every child runs in its own process group, so that stopping it also stops anything it
// forked. Attached children also get a parent-death signal (SIGKILL), so that a test binary
// that panics or is killed takes its clusters with it; detached children (clusters that
// outlive `isthmus cluster up`) start a new session instead and are stopped through their
// recorded process IDs.
//
// Linux sends the parent-death signal when the thread that started the child exits, not
// the process. Go keeps its threads, except one whose goroutine exits while locked to it
// (runtime.LockOSThread): start attached children from ordinary goroutines, never inside
// netlab's Namespace.Do, whose thread may be discarded.
type Process struct {
	Name    string // what reports call it
	LogPath string // where its output goes
	cmd     *exec.Cmd
	done    chan struct{} // closed when the process has exited
	err     error         // exit status; valid after done is closed
}

// Start starts bin with args, its output appended to logPath and extraEnv added to this
// process's environment. A detached process starts a new session and outlives this one.
func Start(name, bin string, args []string, logPath string, detached bool, extraEnv []string) (*Process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s: open log: %w", name, err)
	}
	defer logf.Close() // the child has its own copy of the descriptor
	cmd := exec.Command(bin, args...)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.Env = append(os.Environ(), extraEnv...)
	if detached {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %s: %w", name, bin, err)
	}
	p := &Process{Name: name, cmd: cmd, LogPath: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// PID returns the process ID (also its process group ID).
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ExitError describes how the process ended, with the tail of its log, for reports of a
// crashed component.
func (p *Process) ExitError() error {
	status := "exited"
	if p.err != nil {
		status = p.err.Error()
	}
	return fmt.Errorf("%s %s; last lines of %s:\n%s", p.Name, status, p.LogPath, indent(LogTail(p.LogPath, 15)))
}

// Stop sends SIGTERM to the process group, waits up to grace, then SIGKILLs the group. It
// returns once the process has exited, and always ends with a SIGKILL to the group so
// that children the process forked and left behind go too. Calling it again, or after
// the process exited on its own, is safe.
func (p *Process) Stop(grace time.Duration) {
	if p.Exited() {
		killGroup(p.PID(), syscall.SIGKILL) // leftovers in the group, if any
		return
	}
	killGroup(p.PID(), syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		killGroup(p.PID(), syscall.SIGKILL)
		<-p.done
	}
	killGroup(p.PID(), syscall.SIGKILL)
}

// killGroup signals the process group pgid; a group that no longer exists is fine.
func killGroup(pgid int, sig syscall.Signal) {
	if pgid <= 1 {
		return
	}
	if err := syscall.Kill(-pgid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = syscall.Kill(pgid, sig)
	}
}

// StopPID stops a process this program did not start (a detached cluster's component
// recorded in its state file): SIGTERM to its group, then SIGKILL after grace. It only acts
// when the process's command line still mentions marker, so a recycled PID is never hit.
func StopPID(pid int, marker string, grace time.Duration) {
	if !PIDMatches(pid, marker) {
		return
	}
	killGroup(pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !PIDMatches(pid, marker) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	killGroup(pid, syscall.SIGKILL)
	for i := 0; i < 100 && PIDMatches(pid, marker); i++ {
		time.Sleep(20 * time.Millisecond)
	}
}

// PIDMatches reports whether pid is alive (not a zombie) and its command line contains
// marker. The marker check is what makes a recorded PID safe to signal later: a PID the
// kernel has given to an unrelated process does not carry it.
func PIDMatches(pid int, marker string) bool {
	if pid <= 1 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state field follows the parenthesised command name.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return bytes.Contains(cmdline, []byte(marker))
}

// LogTail returns the last n lines of the file at path.
func LogTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	defer f.Close()
	const max = 64 * 1024
	if st, err := f.Stat(); err == nil && st.Size() > max {
		f.Seek(st.Size()-max, io.SeekStart)
	}
	data, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

func indent(s string) string {
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
