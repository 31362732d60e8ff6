package peerbench

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Syscall counts are not part of the timed table: strace stops the relay at every call,
// so rates under it mean nothing, but the counts per operation are exact, and they are
// the measured cause where a relay spends more per connection or per message.

// SyscallCount is what strace -c -f counted in a relay over one phase.
type SyscallCount struct {
	Ops    int            `json:"ops"`    // connections or round trips in the phase
	Total  int            `json:"total"`  // system calls, every thread
	ByName map[string]int `json:"byName"` // per system call
}

// PerOp returns system calls per operation.
func (s SyscallCount) PerOp() float64 {
	if s.Ops == 0 {
		return 0
	}
	return float64(s.Total) / float64(s.Ops)
}

// traced runs op with strace -c -f attached to r's processes and returns the counts; op
// returns how many operations it did.
func traced(r *relay, dir, label string, op func() (int, error)) (SyscallCount, error) {
	var sc SyscallCount
	bin, err := exec.LookPath("strace")
	if err != nil {
		return sc, fmt.Errorf("peerbench: syscall counts need strace: %w", err)
	}
	out := filepath.Join(dir, r.name+"-"+label+".strace")
	args := []string{"-c", "-f", "-o", out}
	for _, p := range tree(r.p.PID()) {
		args = append(args, "-p", strconv.Itoa(p))
	}
	cmd := exec.Command(bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return sc, fmt.Errorf("peerbench: strace: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return sc, fmt.Errorf("peerbench: strace: %w", err)
	}
	// strace says "Process N attached" per thread; the first line is enough to know it
	// holds the process, and the rest attach within milliseconds.
	attached := make(chan struct{})
	go func() {
		s := bufio.NewScanner(stderr)
		once := false
		for s.Scan() {
			if !once && strings.Contains(s.Text(), "attached") {
				once = true
				close(attached)
			}
		}
		if !once {
			close(attached)
		}
	}()
	select {
	case <-attached:
	case <-time.After(10 * time.Second):
	}
	time.Sleep(100 * time.Millisecond) // the other threads' attach messages
	n, opErr := op()
	cmd.Process.Signal(syscall.SIGINT)
	cmd.Wait()
	if opErr != nil {
		return sc, opErr
	}
	sc, err = parseStraceSummary(out)
	sc.Ops = n
	return sc, err
}

// parseStraceSummary reads the table strace -c writes: "% time seconds usecs/call calls
// errors syscall" rows, then a "total" row.
func parseStraceSummary(path string) (SyscallCount, error) {
	sc := SyscallCount{ByName: map[string]int{}}
	b, err := os.ReadFile(path)
	if err != nil {
		return sc, fmt.Errorf("peerbench: strace summary: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || strings.HasPrefix(f[0], "%") || strings.HasPrefix(f[0], "-") {
			continue
		}
		calls, err := strconv.Atoi(f[3])
		if err != nil {
			continue
		}
		name := f[len(f)-1]
		if name == "total" {
			sc.Total = calls
			continue
		}
		sc.ByName[name] = calls
	}
	if sc.Total == 0 {
		return sc, fmt.Errorf("peerbench: strace summary %s has no total", path)
	}
	return sc, nil
}
