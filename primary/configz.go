package primary

import (
	"context"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// configState is what the primary last did with the traffic configuration: the status of
// every object for /debug/configz and the rejection counter. Safe for concurrent use.
type configState struct {
	rejected *prometheus.CounterVec
	// events carries each newly refused object version to the event writer (runEvents);
	// record never blocks on it, so a slow API server cannot slow pushes: when it is
	// full the Event is dropped (the refusal is still on configz and in the metric).
	events chan ConfigStatus
	// noCRDs says the config cluster had no Istio CRDs at the first look, pushed that a
	// push has carried the traffic configuration: either lets Ready report true.
	noCRDs, pushed atomic.Bool

	mu     sync.Mutex
	status []ConfigStatus // guarded by mu; from the last push
	// counted holds the refusals already counted, by kind/namespace/name@resourceVersion,
	// so that every push of an unchanged refused object does not count it again; guarded
	// by mu.
	counted map[string]bool
}

// newConfigState registers isthmus_primary_config_rejected_total on reg.
func newConfigState(reg prometheus.Registerer) (*configState, error) {
	c := &configState{
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "isthmus_primary_config_rejected_total",
			Help: "Istio objects refused (not applied), by kind and reason; counted once per object version.",
		}, []string{"kind", "reason"}),
		counted: map[string]bool{},
		events:  make(chan ConfigStatus, 64),
	}
	if err := reg.Register(c.rejected); err != nil {
		return nil, err
	}
	return c, nil
}

// ready reports whether the traffic configuration no longer holds readiness back: a
// primary that served before its VirtualServices were read would send every client the
// default routes (all subsets alike) after each restart.
func (c *configState) ready() bool { return c.noCRDs.Load() || c.pushed.Load() }

// record stores a plan's status and counts refusals not seen before.
func (c *configState) record(st []ConfigStatus) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.status = st
	next := map[string]bool{}
	for _, s := range st {
		if s.Applied {
			continue
		}
		id := s.Kind + "/" + s.Namespace + "/" + s.Name + "@" + s.ResourceVersion
		if !c.counted[id] {
			c.rejected.WithLabelValues(s.Kind, s.Reason).Inc()
			select {
			case c.events <- s:
			default:
			}
		}
		next[id] = true
	}
	c.counted = next // objects gone or changed are forgotten
}

// ConfigzResponse is the body of /debug/configz.
type ConfigzResponse struct {
	// Watching says whether the primary reads Istio configuration at all (Config.IstioClient).
	Watching bool           `json:"watching"`
	Objects  []ConfigStatus `json:"objects"`
}

// serveConfigz lists every VirtualService and DestinationRule with what the last push
// did with it.
func (p *Primary) serveConfigz(w http.ResponseWriter, _ *http.Request) {
	p.config.mu.Lock()
	resp := ConfigzResponse{Watching: p.cfg.IstioClient != nil, Objects: append([]ConfigStatus{}, p.config.status...)}
	p.config.mu.Unlock()
	writeJSON(w, resp)
}

// EventReasonRejected is the reason of the Warning Event the primary records on an Istio
// object it refuses; the message starts with the metric's reason code.
const EventReasonRejected = "IsthmusRejected"

// runEvents records a Warning Event on every refused object (one per object version)
// until ctx ends, so that `kubectl describe` and `kubectl get events` show why the
// configuration is not applied. Failures are logged: the refusal stays on configz.
func (c *configState) runEvents(ctx context.Context, client kubernetes.Interface, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case st := <-c.events:
			now := metav1.NewTime(time.Now())
			ev := &corev1.Event{
				ObjectMeta: metav1.ObjectMeta{GenerateName: st.Name + ".", Namespace: st.Namespace},
				InvolvedObject: corev1.ObjectReference{
					APIVersion: apiVersionOf(st.Kind), Kind: st.Kind, Namespace: st.Namespace, Name: st.Name,
					UID: types.UID(st.UID), ResourceVersion: st.ResourceVersion,
				},
				Reason: EventReasonRejected, Message: st.Reason + ": " + st.Message, Type: corev1.EventTypeWarning,
				Source: corev1.EventSource{Component: "isthmus-primary"}, FirstTimestamp: now, LastTimestamp: now, Count: 1,
			}
			ectx, cancel := context.WithTimeout(ctx, 10*time.Second)
			if _, err := client.CoreV1().Events(st.Namespace).Create(ectx, ev, metav1.CreateOptions{}); err != nil && ctx.Err() == nil {
				log.Warn("istio config: recording the rejection event", "kind", st.Kind, "object", st.Namespace+"/"+st.Name, "err", err)
			}
			cancel()
		}
	}
}

// apiVersionOf is the group version of an Istio kind in ConfigStatus.
func apiVersionOf(kind string) string {
	if kind == KindAuthorizationPolicy || kind == KindPeerAuthentication {
		return istioSecurityGV
	}
	return istioNetworkingGV
}
