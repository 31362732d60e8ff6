package peerbench

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// clockTick is the unit of utime and stime in /proc/<pid>/stat (USER_HZ, 100 on every
// Linux this runs on).
const clockTick = 10 * time.Millisecond

// tree returns pid and its descendants (nginx's master and worker), read from
// /proc/<pid>/task/<tid>/children.
func tree(pid int) []int {
	out := []int{pid}
	for i := 0; i < len(out); i++ {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", out[i]))
		for _, t := range tasks {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", out[i], t.Name()))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

// usage is what a relay's processes hold at one instant.
type usage struct {
	cpu time.Duration // user + system CPU since start, every process of the tree
	rss int64         // resident bytes (VmRSS), summed
	fds int           // open descriptors, summed
}

// measure reads pid's tree from /proc: CPU from stat (fields 14 and 15, which count the
// process's every thread, exited ones included), VmRSS from status, fds from fd/.
func measure(pid int) (usage, error) {
	var u usage
	for _, p := range tree(pid) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			return u, fmt.Errorf("peerbench: read stat of %d: %w", p, err)
		}
		// The command name (field 2) is in parentheses and may hold spaces: fields
		// are counted after its closing one.
		s := string(stat)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) < 13 {
			return u, fmt.Errorf("peerbench: short stat of %d", p)
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		u.cpu += time.Duration(ut+st) * clockTick
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			return u, fmt.Errorf("peerbench: read status of %d: %w", p, err)
		}
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				u.rss += kb * 1024
			}
		}
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		if err != nil {
			return u, fmt.Errorf("peerbench: read fds of %d: %w", p, err)
		}
		u.fds += len(fds)
	}
	return u, nil
}

// pin sets the CPU affinity of every thread of the given processes to cpus (nil: every
// CPU of the machine) and returns a function that undoes it. Threads created later
// inherit their creator's mask.
func pin(pids []int, cpus []int) (restore func(), err error) {
	type saved struct {
		tid  int
		mask unix.CPUSet
	}
	var olds []saved
	restore = func() {
		for _, o := range olds {
			unix.SchedSetaffinity(o.tid, &o.mask)
		}
	}
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	for _, pid := range pids {
		tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		if err != nil {
			restore()
			return nil, fmt.Errorf("peerbench: list threads of %d: %w", pid, err)
		}
		for _, t := range tasks {
			tid, _ := strconv.Atoi(t.Name())
			var old unix.CPUSet
			if unix.SchedGetaffinity(tid, &old) != nil {
				continue // the thread ended
			}
			if err := unix.SchedSetaffinity(tid, &set); err != nil {
				continue
			}
			olds = append(olds, saved{tid, old})
		}
	}
	return restore, nil
}
