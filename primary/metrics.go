package primary

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the primary's Prometheus metrics, named isthmus_primary_<what>_<unit>. The
// counters are updated where things happen; the per-cluster gauges are refreshed by loop
// from statuses, so that metrics reads cluster state without knowing who holds it.
type metrics struct {
	statuses    func() []ClusterStatus
	pushes      prometheus.Counter
	pushErrors  prometheus.Counter
	pushSeconds prometheus.Histogram
	proxies     prometheus.Gauge
	nacks       *prometheus.CounterVec
	rejected    prometheus.Counter
	state       *prometheus.GaugeVec
	endpoints   *prometheus.GaugeVec
}

// newMetrics registers the metrics with reg; statuses is called once a second by loop.
// It fails when a name is already registered (two primaries on one registry).
func newMetrics(reg prometheus.Registerer, statuses func() []ClusterStatus) (*metrics, error) {
	m := &metrics{
		statuses:    statuses,
		pushes:      prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_primary_pushes_total", Help: "xDS pushes (every view rebuilt once)."}),
		pushErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_primary_push_errors_total", Help: "Views that failed to build or publish."}),
		pushSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "isthmus_primary_push_duration_seconds", Help: "Time to rebuild and publish every view.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		proxies:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "isthmus_primary_connected_proxies", Help: "Open xDS streams."}),
		nacks:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_primary_nacks_total", Help: "Responses proxies rejected, by type URL."}, []string{"type"}),
		rejected:    prometheus.NewCounter(prometheus.CounterOpts{Name: "isthmus_primary_rejected_streams_total", Help: "xDS streams refused for malformed node metadata."}),
		state:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "isthmus_primary_cluster_state", Help: "1 for each cluster's current state."}, []string{"cluster", "state"}),
		endpoints:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "isthmus_primary_cluster_endpoints", Help: "Endpoints held per cluster."}, []string{"cluster"}),
	}
	for _, c := range []prometheus.Collector{m.pushes, m.pushErrors, m.pushSeconds, m.proxies, m.nacks, m.rejected, m.state, m.endpoints} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// loop refreshes the per-cluster gauges once a second until ctx ends. The gauges are
// reset first, so that a removed cluster's series disappear instead of freezing.
func (m *metrics) loop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		m.state.Reset()
		m.endpoints.Reset()
		for _, s := range m.statuses() {
			m.state.WithLabelValues(string(s.ID), string(s.State)).Set(1)
			m.endpoints.WithLabelValues(string(s.ID)).Set(float64(s.Endpoints))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
