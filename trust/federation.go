package trust

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"reflect"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// FederationConfig configures a Federation.
type FederationConfig struct {
	// TrustDomain is the cluster's own domain; required.
	TrustDomain mesh.TrustDomain
	// Client and Namespace locate the federation relationships (FederationConfigMap) and
	// the bundle store (BundleConfigMap) it writes; required.
	Client    kubernetes.Interface
	Namespace string
	// Endpoint is the domain's own bundle endpoint; its bundle is written into the store
	// too, so `trust bundle show` and the sequence survive restarts. Optional.
	Endpoint *BundleEndpoint
	// FetchTimeout bounds one fetch of a peer's bundle; default 10 s.
	FetchTimeout time.Duration
	// MinRefresh and MaxRefresh bound how a peer's refresh hint is honoured: a hint of a
	// millisecond does not make a busy loop, a hint of a week does not leave a rotation
	// unseen for a week. Defaults 1 s and 1 h.
	MinRefresh, MaxRefresh time.Duration
	// Log receives refused fetches and store writes; nil discards.
	Log *slog.Logger
	// Metrics registers the federation's metrics; nil uses a private registry.
	Metrics prometheus.Registerer
}

// Federation runs a primary's side of multi-trust: it watches the federation
// relationships, fetches each peer's bundle as its refresh hint asks (keeping the last good
// bundle whenever a fetch is refused), and keeps the bundle store equal to the bundles in
// force — the local domain's from Endpoint, each peer's from its watcher — so that every
// workload's agent gets them. A relationship removed takes its domain's bundle out of the
// store. Bundles are never merged: each stays under its own domain.
type Federation struct {
	cfg     FederationConfig
	store   BundleStore
	fetches *prometheus.CounterVec
	writes  *prometheus.CounterVec

	mu sync.Mutex
	// watchers are the running peer watchers by domain, with their relationship and the
	// cancel of their goroutine; removed lists domains whose bundle must leave the store;
	// storeErr is the last failed write; all guarded by mu.
	watchers map[mesh.TrustDomain]*runningPeer
	removed  map[mesh.TrustDomain]bool
	storeErr string
	relErr   string

	kick chan struct{}
}

type runningPeer struct {
	rel    Relationship
	w      *peerWatcher
	stored *spiffebundle.Bundle // the bundle last written to (or found in) the store
	cancel context.CancelFunc
}

// NewFederation validates cfg.
func NewFederation(cfg FederationConfig) (*Federation, error) {
	if cfg.Client == nil || cfg.Namespace == "" {
		return nil, errors.New("trust: federation: Client and Namespace are required")
	}
	if _, err := mesh.ParseTrustDomain(string(cfg.TrustDomain)); err != nil {
		return nil, fmt.Errorf("trust: federation: %w", err)
	}
	if cfg.FetchTimeout <= 0 {
		cfg.FetchTimeout = 10 * time.Second
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = time.Second
	}
	if cfg.MaxRefresh <= 0 {
		cfg.MaxRefresh = time.Hour
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.Metrics == nil {
		cfg.Metrics = prometheus.NewRegistry()
	}
	f := &Federation{cfg: cfg, store: BundleStore{Client: cfg.Client, Namespace: cfg.Namespace},
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_trust_federation_fetches_total",
			Help: "Fetches of peer bundles, by peer trust domain and result (ok or the refusal reason)."}, []string{"peer", "result"}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_trust_federation_store_writes_total",
			Help: "Writes of the bundle store by the federation, by result."}, []string{"result"}),
		watchers: map[mesh.TrustDomain]*runningPeer{}, removed: map[mesh.TrustDomain]bool{}, kick: make(chan struct{}, 1)}
	for _, c := range []prometheus.Collector{f.fetches, f.writes, peerCollector{f}} {
		if err := cfg.Metrics.Register(c); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// Run watches the relationships and keeps the store current until ctx ends.
func (f *Federation) Run(ctx context.Context) error {
	defer f.stopAll()
	go WatchRelationships(ctx, f.cfg.Client, f.cfg.Namespace, func(rels []Relationship) { f.setRelationships(ctx, rels) },
		func(err error) {
			f.mu.Lock()
			f.relErr = err.Error()
			f.mu.Unlock()
			f.cfg.Log.Error("federation relationships refused; the ones in force stay", "err", err)
		})
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastErr := ""
	for {
		// Retried every tick; logged when the error changes, not every second (it is on
		// trustz and in the metrics meanwhile).
		if err := f.syncStore(ctx); err != nil && ctx.Err() == nil {
			if err.Error() != lastErr {
				f.cfg.Log.Warn("bundle store not updated; retrying every second", "err", err)
			}
			lastErr = err.Error()
		} else {
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return nil
		case <-f.kick:
		case <-tick.C: // the local anchors are polled: a reloaded CA changes them
		}
	}
}

func (f *Federation) stopAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.watchers {
		p.cancel()
	}
}

func (f *Federation) wake() {
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// setRelationships starts, restarts and stops peer watchers to match rels.
func (f *Federation) setRelationships(ctx context.Context, rels []Relationship) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.relErr = ""
	want := map[mesh.TrustDomain]Relationship{}
	for _, r := range rels {
		td := mesh.TrustDomain(r.TrustDomain)
		if td == f.cfg.TrustDomain {
			f.relErr = fmt.Sprintf("trust: federation: relationship with %s ignored: it is this cluster's own trust domain", td)
			continue
		}
		want[td] = r
	}
	for td, p := range f.watchers {
		if r, ok := want[td]; !ok || !reflect.DeepEqual(r, p.rel) {
			p.cancel()
			delete(f.watchers, td)
			if !ok {
				f.removed[td] = true
				f.fetches.DeletePartialMatch(prometheus.Labels{"peer": string(td)})
				f.cfg.Log.Info("federation relationship removed; its bundle leaves the store", "peer", td)
			}
		}
	}
	for td, r := range want {
		if _, ok := f.watchers[td]; ok {
			continue
		}
		delete(f.removed, td)
		w, err := newPeerWatcher(r, f.cfg.FetchTimeout, f.cfg.MinRefresh, f.cfg.MaxRefresh,
			func(reason string) { f.fetches.WithLabelValues(string(td), reason).Inc() },
			func(*spiffebundle.Bundle) { f.wake() })
		if err != nil {
			f.relErr = err.Error()
			continue
		}
		wctx, cancel := context.WithCancel(ctx)
		f.watchers[td] = &runningPeer{rel: r, w: w, cancel: cancel}
		go func() {
			w.Run(wctx)
		}()
		f.cfg.Log.Info("federating", "peer", td, "endpoint", r.EndpointURL, "profile", r.Profile)
	}
	f.wake()
}

var errNoChange = errors.New("no change")

// syncStore writes the bundles in force into the store, and takes removed domains out.
// Nothing is written when the store already holds them.
func (f *Federation) syncStore(ctx context.Context) error {
	want := map[mesh.TrustDomain]*spiffebundle.Bundle{}
	if f.cfg.Endpoint != nil {
		if b, err := f.cfg.Endpoint.Refresh(); err == nil {
			want[f.cfg.TrustDomain] = b
		}
	}
	f.mu.Lock()
	for td, p := range f.watchers {
		if b := p.w.InForce(); b != nil {
			want[td] = b
		}
	}
	removed := slices.Collect(maps.Keys(f.removed))
	f.mu.Unlock()
	_, err := f.store.Update(ctx, func(set *BundleSet) error {
		before, _ := BundleData(set)
		for _, td := range removed {
			for a, t := range set.Aliases() {
				if t == td {
					set.RemoveAlias(a) // an alias of a domain no longer trusted means nothing
				}
			}
			set.Remove(td)
		}
		for td, b := range want {
			if err := set.Set(b); err != nil {
				return fmt.Errorf("trust: federation: store bundle of %s: %w", td, err)
			}
		}
		after, err := BundleData(set)
		if err != nil {
			return err
		}
		if maps.Equal(before, after) {
			return errNoChange
		}
		return nil
	})
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case errors.Is(err, errNoChange):
		err = nil
	case err != nil:
		f.writes.WithLabelValues("error").Inc()
		f.storeErr = err.Error()
		return err
	default:
		f.writes.WithLabelValues("ok").Inc()
	}
	f.storeErr = ""
	for _, td := range removed {
		delete(f.removed, td)
	}
	for td, b := range want {
		if p, ok := f.watchers[td]; ok {
			p.stored = b
		}
	}
	return nil
}

// FederationStatus is the federation's part of /debug/trustz.
type FederationStatus struct {
	// Endpoint is the local bundle endpoint's bundle.
	Endpoint *BundleEndpointStatus `json:"bundleEndpoint,omitempty"`
	// Peers are the federated domains, sorted.
	Peers []PeerStatus `json:"peers"`
	// RelationshipsError is why the relationships ConfigMap was last refused, if it was.
	RelationshipsError string `json:"relationshipsError,omitempty"`
	// StoreError is why the last write of the bundle store failed, if it did.
	StoreError string `json:"storeError,omitempty"`
}

// Status reports the federation now.
func (f *Federation) Status() FederationStatus {
	f.mu.Lock()
	st := FederationStatus{Peers: []PeerStatus{}, RelationshipsError: f.relErr, StoreError: f.storeErr}
	for _, td := range slices.Sorted(maps.Keys(f.watchers)) {
		p := f.watchers[td]
		ps := p.w.Status()
		ps.Stored = p.stored != nil && p.stored.Equal(p.w.InForce())
		st.Peers = append(st.Peers, ps)
	}
	f.mu.Unlock()
	if f.cfg.Endpoint != nil {
		es := f.cfg.Endpoint.Status()
		st.Endpoint = &es
	}
	return st
}

// Refresh makes every peer fetch now (an operator's `trust federate refresh`, tests).
func (f *Federation) Refresh() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.watchers {
		p.w.Refresh()
	}
}

// TrustzHandler serves the CA's status (if ca is not nil) and the federation's as one JSON
// document: /debug/trustz.
func TrustzHandler(ca *Server, f *Federation) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		doc := struct {
			*TrustStatus
			Federation *FederationStatus `json:"federation,omitempty"`
		}{}
		if ca != nil {
			st := ca.Status()
			doc.TrustStatus = &st
		}
		if f != nil {
			fs := f.Status()
			doc.Federation = &fs
		}
		var b bytes.Buffer
		enc := json.NewEncoder(&b)
		enc.SetIndent("", "  ")
		enc.Encode(doc)
		w.Header().Set("Content-Type", "application/json")
		w.Write(b.Bytes())
	})
}

// peerCollector exports each peer's status as gauges at scrape time.
type peerCollector struct{ f *Federation }

var (
	peerSequenceDesc = prometheus.NewDesc("isthmus_trust_federation_bundle_sequence", "spiffe_sequence of the peer bundle in force.", []string{"peer"}, nil)
	peerAgeDesc      = prometheus.NewDesc("isthmus_trust_federation_bundle_age_seconds", "Time since a fetch last confirmed the peer bundle in force (-1: never).", []string{"peer"}, nil)
	peerSuccessDesc  = prometheus.NewDesc("isthmus_trust_federation_last_success_timestamp_seconds", "When a fetch of the peer's bundle was last accepted (0: never).", []string{"peer"}, nil)
	peerNextDesc     = prometheus.NewDesc("isthmus_trust_federation_next_refresh_timestamp_seconds", "When the peer's bundle is fetched next.", []string{"peer"}, nil)
	peerFailingDesc  = prometheus.NewDesc("isthmus_trust_federation_consecutive_failures", "Refused fetches since the last accepted one.", []string{"peer"}, nil)
)

func (c peerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{peerSequenceDesc, peerAgeDesc, peerSuccessDesc, peerNextDesc, peerFailingDesc} {
		ch <- d
	}
}

func (c peerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.f.Status().Peers {
		age, success := -1.0, 0.0
		if !p.LastSuccess.IsZero() {
			age, success = time.Since(p.LastSuccess).Seconds(), float64(p.LastSuccess.UnixNano())/1e9
		}
		next := 0.0
		if !p.NextRefresh.IsZero() {
			next = float64(p.NextRefresh.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(peerSequenceDesc, prometheus.GaugeValue, float64(p.Sequence), p.TrustDomain)
		ch <- prometheus.MustNewConstMetric(peerAgeDesc, prometheus.GaugeValue, age, p.TrustDomain)
		ch <- prometheus.MustNewConstMetric(peerSuccessDesc, prometheus.GaugeValue, success, p.TrustDomain)
		ch <- prometheus.MustNewConstMetric(peerNextDesc, prometheus.GaugeValue, next, p.TrustDomain)
		ch <- prometheus.MustNewConstMetric(peerFailingDesc, prometheus.GaugeValue, float64(p.Failures), p.TrustDomain)
	}
}

// StartSequence returns the sequence a restarted primary's bundle endpoint starts from:
// the one stored for td when its roots are still anchors, else one more, so a peer never
// sees the sequence go down. Errors (no store yet) start at 1.
func StartSequence(ctx context.Context, store BundleStore, td mesh.TrustDomain, anchors []*x509.Certificate) uint64 {
	set, err := store.Load(ctx)
	if err != nil {
		return 1
	}
	b, ok := set.Get(td)
	if !ok {
		return 1
	}
	seq, _ := b.SequenceNumber()
	if anchorsKey(b.X509Authorities()) == anchorsKey(anchors) {
		return max(seq, 1)
	}
	return seq + 1
}
