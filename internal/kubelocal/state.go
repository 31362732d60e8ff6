package kubelocal

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/proc"
)

// StateFile is the name of the file, in a cluster's directory, that records how to find
// and stop it.
const StateFile = "cluster.json"

// State is what a cluster records about itself, so that another process (`isthmus cluster
// list|down`) can find and stop a detached cluster.
type State struct {
	Name       string         `json:"name"`
	Dir        string         `json:"dir"`
	URL        string         `json:"url"`
	Kubeconfig string         `json:"kubeconfig"`
	Node       string         `json:"node"`
	Started    time.Time      `json:"started"`
	Detached   bool           `json:"detached"`
	PIDs       map[string]int `json:"pids"` // component name → process (group) ID
}

// A State is written once, when its cluster is ready, and never updated; after a restart
// of one component (RestartAPIServer) its PID there is stale. Readers match PIDs against
// the cluster's directory (proc.PIDMatches) before signalling them, so a stale or reused
// PID is harmless.

// Health of a recorded cluster, from whether its processes are alive.
const (
	HealthRunning  = "Running"  // every component is alive
	HealthDegraded = "Degraded" // some components have exited
	HealthStopped  = "Stopped"  // none is alive
)

// Health reports whether the recorded processes are alive.
func (s *State) Health() string {
	alive := 0
	for _, pid := range s.PIDs {
		if proc.PIDMatches(pid, s.Dir) {
			alive++
		}
	}
	switch {
	case alive == 0:
		return HealthStopped
	case alive < len(s.PIDs):
		return HealthDegraded
	default:
		return HealthRunning
	}
}

// writeState writes StateFile through a temporary file and a rename, so that a concurrent
// `isthmus cluster list` never reads half a file.
func (c *Cluster) writeState() error {
	s := State{
		Name:       c.Name,
		Dir:        c.Dir,
		URL:        c.URL,
		Kubeconfig: c.Kubeconfig,
		Node:       c.NodeName,
		Started:    time.Now().UTC().Truncate(time.Second),
		Detached:   c.cfg.Detached,
		PIDs:       c.PIDs(),
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(c.Dir, StateFile+".tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(c.Dir, StateFile))
}

// LoadState reads the state file of the cluster in dir.
func LoadState(dir string) (*State, error) {
	data, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("kubelocal: read cluster state: %w", err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("kubelocal: parse %s: %w", filepath.Join(dir, StateFile), err)
	}
	if s.Name == "" || s.Dir == "" {
		return nil, fmt.Errorf("kubelocal: %s: missing name or dir", filepath.Join(dir, StateFile))
	}
	return &s, nil
}

// ListStates returns the clusters recorded under root (one subdirectory each), sorted by
// name. Subdirectories without a readable state file are reported in the error but do not
// hide the others.
func ListStates(root string) ([]*State, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("kubelocal: list clusters: %w", err)
	}
	var states []*State
	var errs []error
	for _, e := range entries {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue // dot directories keep the logs of failed starts
		}
		s, err := LoadState(filepath.Join(root, e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		states = append(states, s)
	}
	sort.Slice(states, func(i, j int) bool { return states[i].Name < states[j].Name })
	return states, errors.Join(errs...)
}

// stopOrder is the order components are stopped in: everything that talks to the API
// server first, then the API server, then etcd last.
var stopOrder = []string{"node-agent", "kube-controller-manager", "kube-apiserver", "etcd"}

// StopDetached stops the processes a state records, in dependency order, and removes the
// cluster's directory. Processes whose command line no longer mentions the cluster's
// directory (exited, and their PID perhaps reused) are left alone.
func StopDetached(s *State) error {
	done := map[string]bool{}
	for _, name := range stopOrder {
		if pid, ok := s.PIDs[name]; ok {
			proc.StopPID(pid, s.Dir, 5*time.Second)
			done[name] = true
		}
	}
	for name, pid := range s.PIDs {
		if !done[name] {
			proc.StopPID(pid, s.Dir, 5*time.Second)
		}
	}
	for name, pid := range s.PIDs {
		if proc.PIDMatches(pid, s.Dir) {
			return fmt.Errorf("kubelocal: cluster %s: %s (pid %d) is still running after SIGKILL", s.Name, name, pid)
		}
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		return fmt.Errorf("kubelocal: cluster %s: remove %s: %w", s.Name, s.Dir, err)
	}
	return nil
}
