package primary

import (
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// This file holds what a cluster's status is and how a watcher updates it; the link-health
// policy that moves a cluster between synced and unreachable is in linkhealth.go.

// ClusterState is where a cluster's link stands.
type ClusterState string

// Cluster states; see docs/primary.md.
const (
	StateSyncing     ClusterState = "syncing"
	StateSynced      ClusterState = "synced"
	StateTimeout     ClusterState = "timeout"
	StateUnreachable ClusterState = "unreachable"
	StateRemoved     ClusterState = "removed"
	StateError       ClusterState = "error"
)

// ClusterStatus is what /debug/clusterz and `isthmus status` show for one cluster. Its
// JSON form is read by `isthmus status`: renaming a field is a wire change.
type ClusterStatus struct {
	ID         mesh.ClusterID `json:"id"`
	Source     string         `json:"source"` // "local", "secret ns/name" or "file path"
	State      ClusterState   `json:"state"`
	Since      time.Time      `json:"since"`              // when State was entered
	LastSync   time.Time      `json:"lastSync,omitzero"`  // last successful sync or probe
	Staleness  string         `json:"staleness,omitzero"` // how long data has gone unrefreshed, while unreachable
	Withdrawn  bool           `json:"withdrawn,omitzero"` // endpoints withdrawn after the stale window
	Services   int            `json:"services"`
	Endpoints  int            `json:"endpoints"`
	Error      string         `json:"error,omitzero"`
	Credential string         `json:"credential,omitzero"` // short hash of the credential in use
	Rotating   bool           `json:"rotating,omitzero"`   // a new credential is syncing
	PendingErr string         `json:"pendingError,omitzero"`
}

// setState moves the watcher to state s, logging the transition once, and records err as
// the cluster's current error. Entering StateSynced without an error clears the last one;
// other states keep it, so /debug/clusterz shows why a cluster is unreachable.
func (w *clusterWatcher) setState(s ClusterState, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.status.State != s {
		w.status.State = s
		w.status.Since = time.Now()
		w.log.Info("cluster state", "state", s, "err", err)
	}
	if err != nil {
		w.status.Error = err.Error()
	} else if s == StateSynced {
		w.status.Error = ""
	}
}

// recordError shows err (a failed list/watch, say) without changing the state: client-go
// retries by itself, and the probe decides reachability.
func (w *clusterWatcher) recordError(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.status.Error = err.Error()
}

// Status returns the watcher's current status, with the service and endpoint counts of
// what its shard holds now. It takes w.mu and then the registry's lock, never both at
// once, so it may be called from any goroutine, including under Clusters.mu.
func (w *clusterWatcher) Status() ClusterStatus {
	w.mu.Lock()
	s := w.status
	s.Withdrawn = w.withdrawn
	if !w.unreachableSince.IsZero() {
		s.Staleness = time.Since(w.unreachableSince).Round(time.Second).String()
	}
	w.mu.Unlock()
	sd := w.reg.Shard(w.shard)
	if sd != nil {
		s.Services = len(sd.Services)
		s.Endpoints = sd.EndpointCount()
	}
	return s
}
