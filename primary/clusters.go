package primary

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
)

// Clusters keeps one watcher per cluster ID: the local cluster, every cluster named in a
// remote secret, and every kubeconfig file of a directory. It reconciles credentials by
// level: for each source it computes the clusters that should be watched and starts,
// rotates or stops watchers to match.
//
// Clusters owns every goroutine it starts (watchers, credential promotions, removals):
// run returns only after all of them have exited, so a stopped primary leaves nothing
// behind that could still write the registry.
type Clusters struct {
	reg    *Registry
	cfg    watcherConfig
	policy remote.Policy
	log    *slog.Logger
	// newClient builds a client from a credential; tests replace it.
	newClient func(*rest.Config) (kubernetes.Interface, error)
	// wg counts the goroutines started by reconcileSource and removeLocked (stopping a
	// replaced watcher, promoting a rotated one, removing a cluster). run waits for it
	// after the sources that call reconcileSource have stopped, so no Add races the Wait.
	wg sync.WaitGroup

	// mu guards the three maps below. It is never held while waiting for a watcher to
	// stop: stopping waits on informers, and Statuses must stay answerable meanwhile.
	mu      sync.Mutex
	entries map[mesh.ClusterID]*clusterEntry
	refused map[string]ClusterStatus // by source+"|"+key: credentials that cannot be used
	removed map[mesh.ClusterID]ClusterStatus
}

// clusterEntry is one watched cluster ID. Its fields are guarded by Clusters.mu.
type clusterEntry struct {
	source  string   // which source the credential came from ("local", "secret ns/name", "dir path")
	hash    [32]byte // of the active credential; an unchanged hash means nothing to do
	active  *clusterWatcher
	pending *clusterWatcher // a rotated credential, syncing beside active
	pendErr string          // why pending has not been promoted yet, for /debug/clusterz
}

// newClusters returns a Clusters that watches nothing yet; addLocal and run start it.
func newClusters(reg *Registry, cfg watcherConfig, policy remote.Policy) *Clusters {
	return &Clusters{
		reg: reg, cfg: cfg, policy: policy, log: cfg.Log,
		newClient: func(rc *rest.Config) (kubernetes.Interface, error) { return kubernetes.NewForConfig(rc) },
		entries:   map[mesh.ClusterID]*clusterEntry{},
		refused:   map[string]ClusterStatus{},
		removed:   map[mesh.ClusterID]ClusterStatus{},
	}
}

// credential is one cluster a source wants watched.
type credential struct {
	key     string // the data key or file name, for error reports
	cluster mesh.ClusterID
	config  *rest.Config
	hash    [32]byte
	err     error
}

// addLocal watches the primary's own cluster. Call it before run, and before the
// primary reports ready: Ready counts only the clusters already added.
func (c *Clusters) addLocal(id mesh.ClusterID, client kubernetes.Interface) {
	w := newClusterWatcher(id, "local", client, c.reg, c.cfg)
	c.mu.Lock()
	c.entries[id] = &clusterEntry{source: "local", active: w}
	c.mu.Unlock()
	w.start()
	w.enable()
}

// reconcileSource makes the watched clusters of source match creds (nil creds: the source
// is gone). Refused credentials are recorded for /debug/clusterz; a cluster ID already
// watched from another source is refused as a duplicate without disturbing it.
//
// Per cluster of the source: gone from creds, it is removed; new, a watcher starts and is
// enabled at once; the same hash, nothing happens (so a resync of an unchanged Secret
// costs nothing); a changed hash starts a rotation (promote). It holds c.mu throughout
// and only starts goroutines, never waits for one.
func (c *Clusters) reconcileSource(source string, creds []credential) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.refused { // the source's refusals are recomputed from scratch
		if strings.HasPrefix(k, source+"|") {
			delete(c.refused, k)
		}
	}
	want := map[mesh.ClusterID]credential{}
	for _, cr := range creds {
		refuse := func(err error) {
			c.refused[source+"|"+cr.key] = ClusterStatus{ID: cr.cluster, Source: source + " key " + cr.key, State: StateError, Since: time.Now(), Error: err.Error()}
		}
		if cr.err != nil {
			refuse(cr.err)
			continue
		}
		if e, ok := c.entries[cr.cluster]; ok && e.source != source {
			refuse(fmt.Errorf("duplicate cluster ID %s: already watched from %s; this credential is ignored", cr.cluster, e.source))
			continue
		}
		if _, dup := want[cr.cluster]; dup {
			refuse(fmt.Errorf("duplicate cluster ID %s within %s", cr.cluster, source))
			continue
		}
		want[cr.cluster] = cr
	}
	for id, e := range c.entries {
		if e.source != source {
			continue
		}
		if _, ok := want[id]; !ok {
			c.removeLocked(id, e)
		}
	}
	for id, cr := range want {
		e := c.entries[id]
		if e != nil && e.hash == cr.hash {
			continue
		}
		client, err := c.newClient(cr.config)
		if err != nil {
			c.refused[source+"|"+cr.key] = ClusterStatus{ID: id, Source: source, State: StateError, Since: time.Now(), Error: err.Error()}
			continue
		}
		w := newClusterWatcher(id, source, client, c.reg, c.cfg)
		w.credHash = cr.hash
		if e == nil {
			delete(c.removed, id)
			c.entries[id] = &clusterEntry{source: source, hash: cr.hash, active: w}
			w.start()
			w.enable()
			continue
		}
		// Rotation: sync the new credential beside the old one and swap only once it
		// works, so that the cluster's endpoints never disappear.
		if e.pending != nil {
			c.goTracked(e.pending.stop) // an older rotation, superseded
		}
		e.pending, e.pendErr = w, ""
		w.start()
		c.goTracked(func() { c.promote(id, w, cr.hash) })
	}
}

// goTracked runs f in a goroutine that run waits for. Callers hold mu or are run's own
// sources, so every Add happens before run's Wait.
func (c *Clusters) goTracked(f func()) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
}

// promote swaps a rotated watcher in once it has synced; if it cannot sync within the
// sync timeout the old credential stays and the error is shown. It gives up, leaving the
// entry alone, when w is stopped first (superseded by a newer rotation, the cluster
// removed, or the primary stopping).
func (c *Clusters) promote(id mesh.ClusterID, w *clusterWatcher, hash [32]byte) {
	timer := time.NewTimer(c.cfg.SyncTimeout)
	defer timer.Stop()
	select {
	case <-w.syncedCh:
	case <-w.done:
		return
	case <-timer.C:
		c.mu.Lock()
		if e := c.entries[id]; e != nil && e.pending == w {
			e.pendErr = "new credential has not synced after " + c.cfg.SyncTimeout.String() + ": " + w.Status().Error
		}
		c.mu.Unlock()
		select {
		case <-w.syncedCh:
		case <-w.done:
			return
		}
	}
	c.mu.Lock()
	e := c.entries[id]
	if e == nil || e.pending != w {
		c.mu.Unlock()
		return
	}
	old := e.active
	e.active, e.pending, e.pendErr, e.hash = w, nil, "", hash
	c.mu.Unlock()
	old.stop() // the shard keeps the old data until the new watcher replaces it whole
	w.enable()
	c.log.Info("rotated cluster credential", "cluster", id)
}

// removeLocked forgets cluster id (c.mu held) and, in the background, stops its watchers
// and only then empties its shard, so that a stopping watcher cannot write it again.
func (c *Clusters) removeLocked(id mesh.ClusterID, e *clusterEntry) {
	delete(c.entries, id)
	st := e.active.Status()
	st.State, st.Since, st.Services, st.Endpoints = StateRemoved, time.Now(), 0, 0
	c.removed[id] = st
	active, pending := e.active, e.pending
	c.goTracked(func() {
		if pending != nil {
			pending.stop()
		}
		active.stop()
		c.reg.ReplaceShard(active.shard, nil)
	})
}

// run reconciles the remote secrets of namespace in the local cluster (client) and, when
// dir is set, the kubeconfig files of dir every 5 s, until ctx ends. It then stops every
// watcher and waits for every goroutine Clusters started. The error is the secret
// watch's: it fails only if its informer cannot be set up.
func (c *Clusters) run(ctx context.Context, client kubernetes.Interface, namespace, dir string) error {
	var sources sync.WaitGroup
	var err error
	sources.Add(1)
	go func() {
		defer sources.Done()
		err = c.watchSecrets(ctx, client, namespace)
	}()
	if dir != "" {
		sources.Add(1)
		go func() {
			defer sources.Done()
			c.pollDir(ctx, dir, 5*time.Second)
		}()
	}
	<-ctx.Done()
	sources.Wait() // no reconcileSource after this, so no new tracked goroutine
	c.stopAll()
	c.wg.Wait()
	return err
}

// pollDir scans dir every interval until ctx ends. A directory that cannot be read is
// logged and retried: it may be mounted later.
func (c *Clusters) pollDir(ctx context.Context, dir string, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := c.scanDir(dir); err != nil {
			c.log.Warn("kubeconfig directory", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// stopAll stops every watcher and waits for each. It leaves the registry shards as they
// are: the primary is going away, not the clusters.
func (c *Clusters) stopAll() {
	c.mu.Lock()
	entries := c.entries
	c.entries = map[mesh.ClusterID]*clusterEntry{}
	c.mu.Unlock()
	for _, e := range entries {
		if e.pending != nil {
			e.pending.stop()
		}
		e.active.stop()
	}
}

// Statuses returns every cluster's status, sorted by ID then source: watched clusters,
// refused credentials and removed clusters (which stay listed until the ID is watched
// again). Watcher statuses are read after c.mu is released, so a slow registry read never
// holds up reconciliation.
func (c *Clusters) Statuses() []ClusterStatus {
	type snap struct {
		w       *clusterWatcher
		local   bool
		pending bool
		pendErr string
	}
	c.mu.Lock()
	var out []ClusterStatus
	snaps := make([]snap, 0, len(c.entries))
	for _, e := range c.entries {
		snaps = append(snaps, snap{w: e.active, local: e.source == "local", pending: e.pending != nil, pendErr: e.pendErr})
	}
	for _, s := range c.refused {
		out = append(out, s)
	}
	for _, s := range c.removed {
		out = append(out, s)
	}
	c.mu.Unlock()
	for _, sn := range snaps {
		s := sn.w.Status()
		s.Rotating, s.PendingErr = sn.pending, sn.pendErr
		if !sn.local {
			s.Credential = hex.EncodeToString(sn.w.credHash[:4])
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b ClusterStatus) int {
		if a.ID != b.ID {
			return strings.Compare(string(a.ID), string(b.ID))
		}
		return strings.Compare(a.Source, b.Source)
	})
	return out
}

// Ready reports whether every watched cluster has left its first sync: synced, timed out,
// unreachable or failed. An unreachable remote never holds readiness back.
func (c *Clusters) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.entries {
		if e.active.Status().State == StateSyncing {
			return false
		}
	}
	return true
}

// watchSecrets reconciles remote secrets in namespace of the local cluster until ctx ends.
func (c *Clusters) watchSecrets(ctx context.Context, client kubernetes.Interface, namespace string) error {
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = remote.MultiClusterLabel + "=true" }))
	inf := factory.Core().V1().Secrets().Informer()
	handle := func(obj any) {
		s, ok := unwrap[*corev1.Secret](obj)
		if !ok {
			return
		}
		c.reconcileSecret(s.Namespace+"/"+s.Name, inf.GetIndexer())
	}
	if _, err := inf.AddEventHandler(handlerFuncs(handle)); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	<-ctx.Done()
	return nil
}

// reconcileSecret reads the secret key from the cache (absent: deleted) and reconciles.
// A Secret that does not parse as a whole counts as gone: its clusters are removed
// rather than kept on credentials nobody can vouch for. Per-key problems are refusals.
func (c *Clusters) reconcileSecret(key string, idx cache.Indexer) {
	source := "secret " + key
	obj, ok, _ := idx.GetByKey(key)
	if !ok {
		c.reconcileSource(source, nil)
		return
	}
	s := obj.(*corev1.Secret)
	parsed, err := remote.ParseSecret(s, c.policy)
	if err != nil {
		c.reconcileSource(source, nil)
		return
	}
	creds := make([]credential, 0, len(parsed))
	for _, p := range parsed {
		creds = append(creds, credential{key: p.Key, cluster: p.Cluster, config: p.Config, hash: sha256.Sum256(p.Kubeconfig), err: p.Err})
	}
	c.reconcileSource(source, creds)
}

// scanDir reconciles the kubeconfig files of dir: each regular file is one cluster, named
// by the file name without its extension.
func (c *Clusters) scanDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("primary: read kubeconfig directory: %w", err)
	}
	var creds []credential
	for _, e := range entries {
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		name := strings.TrimSuffix(e.Name(), filepath.Ext(e.Name()))
		cr := credential{key: e.Name()}
		id, err := mesh.ParseClusterID(name)
		if err != nil {
			cr.err = fmt.Errorf("file name is not a cluster ID: %w", err)
			creds = append(creds, cr)
			continue
		}
		cr.cluster = id
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			cr.err = err
		} else {
			cr.hash = sha256.Sum256(data)
			cr.config, cr.err = remote.ParseKubeconfig(data, c.policy)
		}
		creds = append(creds, cr)
	}
	c.reconcileSource("dir "+dir, creds)
	return nil
}

// client returns the client of the active watcher of cluster id (not a pending rotated
// one, which may not work yet).
func (c *Clusters) client(id mesh.ClusterID) (kubernetes.Interface, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[id]
	if e == nil {
		return nil, false
	}
	return e.active.client, true
}
