package primary

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// linkVerdict is what one probe's outcome means for the cluster's endpoints.
type linkVerdict int

const (
	linkUp    linkVerdict = iota // the API server answered
	linkNoise                    // one failed probe: noise, nothing changes
	linkDown                     // unreachable, for less than the stale window
	linkStale                    // unreachable for at least the stale window: withdraw
)

// linkHealth is the link-health policy over one cluster's probes (docs/primary.md says
// why): one failed probe is noise; from the second the cluster is unreachable, since the
// *start* of the first failed probe; once that is StaleWindow ago the endpoints go. It is
// owned by the probe loop and holds no lock.
//
// Counting from the first failed probe's start, not from when the second one ended minus
// some intervals, matters when probes time out: a blackholed API server makes every probe
// last its full timeout, ticks are dropped meanwhile, and the window used to be counted
// from up to a probe interval too late.
type linkHealth struct {
	window   time.Duration
	failures int       // consecutive failed probes
	since    time.Time // when the first of them started
}

// observe records a probe that started at start and ended at end, answered or not.
func (h *linkHealth) observe(start, end time.Time, answered bool) linkVerdict {
	if answered {
		h.failures, h.since = 0, time.Time{}
		return linkUp
	}
	h.failures++
	if h.failures == 1 {
		h.since = start
		return linkNoise
	}
	if end.Sub(h.since) >= h.window {
		return linkStale
	}
	return linkDown
}

// probe checks the API server every ProbeInterval and applies the link-health policy
// (linkHealth): unreachable clusters keep their endpoints for StaleWindow, then lose
// them; a cluster that answers again is republished. It runs until ctx ends.
//
// Forbidden and Unauthorized count as reachable: the server answered, and a credential
// without access to /readyz is a permission matter, shown by the informers' errors, not a
// partition. Endpoints are withdrawn only once the watcher is enabled: a pending
// (rotated) watcher must not clear the shard the active one still fills; one enabled
// later withdraws at its next failed probe.
func (w *clusterWatcher) probe(ctx context.Context) {
	check := w.readyz
	if check == nil {
		rc := w.client.Discovery().RESTClient()
		if rc == nil {
			w.log.Warn("client cannot probe its API server; link health is not tracked for this cluster")
			return
		}
		check = func(ctx context.Context) error { return rc.Get().AbsPath("/readyz").Do(ctx).Error() }
	}
	h := linkHealth{window: w.cfg.StaleWindow}
	t := time.NewTicker(w.cfg.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		start := time.Now()
		pctx, cancel := context.WithTimeout(ctx, max(w.cfg.ProbeInterval, time.Second))
		err := check(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		answered := err == nil || apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err)
		switch v := h.observe(start, time.Now(), answered); v {
		case linkUp:
			w.linkUp()
		case linkDown, linkStale:
			w.linkDown(h.since, v == linkStale, err)
		}
	}
}

// linkDown records that the API server has not answered since since, and withdraws the
// cluster's endpoints when stale (once, and only when enabled).
func (w *clusterWatcher) linkDown(since time.Time, stale bool, err error) {
	w.mu.Lock()
	w.unreachableSince = since
	withdraw := stale && !w.withdrawn && isClosed(w.enableCh)
	if withdraw {
		w.withdrawn = true // from here processNext drops keys
	}
	w.mu.Unlock()
	w.setState(StateUnreachable, fmt.Errorf("API server probe: %w", err))
	if withdraw {
		w.log.Warn("withdrawing endpoints of unreachable cluster", "stale_for", time.Since(since).Round(time.Second), "window", w.cfg.StaleWindow)
		// Under writeMu, after withdrawn is set: no reconcile that read withdrawn=false
		// can land after this and put a service back into the emptied shard.
		w.writeMu.Lock()
		w.reg.ReplaceShard(w.shard, nil)
		w.writeMu.Unlock()
	}
}

// linkUp records that the API server answered, and republishes a withdrawn cluster from
// its caches (the informers catch up with what changed meanwhile).
func (w *clusterWatcher) linkUp() {
	w.mu.Lock()
	wasUnreachable := !w.unreachableSince.IsZero()
	wasWithdrawn := w.withdrawn
	w.unreachableSince = time.Time{}
	w.withdrawn = false
	synced := w.synced
	if synced {
		w.status.LastSync = time.Now()
	}
	w.mu.Unlock()
	if wasUnreachable && synced {
		w.setState(StateSynced, nil)
		if wasWithdrawn {
			w.log.Info("cluster reachable again; republishing")
			w.publishAll()
		}
	}
}

// isClosed reports whether ch is closed, without blocking.
func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
