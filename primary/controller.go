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
type Clusters struct {
	reg    *Registry
	cfg    watcherConfig
	policy remote.Policy
	log    *slog.Logger
	// newClient builds a client from a credential; tests replace it.
	newClient func(*rest.Config) (kubernetes.Interface, error)

	mu sync.Mutex
	// entries, refused and removed are guarded by mu.
	entries map[mesh.ClusterID]*clusterEntry
	refused map[string]ClusterStatus // by source+"|"+key: credentials that cannot be used
	removed map[mesh.ClusterID]ClusterStatus
}

type clusterEntry struct {
	source  string
	hash    [32]byte
	active  *clusterWatcher
	pending *clusterWatcher // a rotated credential, syncing
	pendErr string
}

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

// addLocal watches the primary's own cluster.
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
func (c *Clusters) reconcileSource(source string, creds []credential) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.refused {
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
			go e.pending.stop()
		}
		e.pending, e.pendErr = w, ""
		w.start()
		go c.promote(id, w, cr.hash)
	}
}

// promote swaps a rotated watcher in once it has synced; if it cannot sync within the
// sync timeout the old credential stays and the error is shown.
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

func (c *Clusters) removeLocked(id mesh.ClusterID, e *clusterEntry) {
	delete(c.entries, id)
	st := e.active.Status()
	st.State, st.Since, st.Services, st.Endpoints = StateRemoved, time.Now(), 0, 0
	c.removed[id] = st
	active, pending := e.active, e.pending
	go func() {
		if pending != nil {
			pending.stop()
		}
		active.stop()
		c.reg.ReplaceShard(active.shard, nil)
	}()
}

// stopAll stops every watcher.
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

// Statuses returns every cluster's status, sorted by ID then source.
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

// client returns the client of the active watcher of cluster id.
func (c *Clusters) client(id mesh.ClusterID) (kubernetes.Interface, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[id]
	if e == nil {
		return nil, false
	}
	return e.active.client, true
}
