package primary

import (
	"encoding/json"
	"net/http"
	"slices"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"
)

// ClusterzResponse is the body of /debug/clusterz (also what `isthmus status` reads).
type ClusterzResponse struct {
	Cluster     string          `json:"cluster"`     // the primary's own cluster
	StaleWindow string          `json:"staleWindow"` // the link-health policy in force
	Ready       bool            `json:"ready"`
	Clusters    []ClusterStatus `json:"clusters"`
	// Proxies are the streams of the secure xDS port: who each authenticated as, its
	// cluster, network and path.
	Proxies []Proxy `json:"proxies,omitempty"`
}

// Handler serves /readyz, /metrics and the debug endpoints:
//
//	/debug/clusterz               every cluster's link state, staleness and error
//	/debug/registryz              the merged registry view
//	/debug/config_dump?proxy=ID   the resources a connected proxy receives
//	/debug/config_dump?view=K     the same for a view key, e.g. grpc/network-1, grpc/network-1@us-east1/us-east1-b or grpc/network-1~demo
//	/debug/proxyz                 connected proxies and their views
//	/debug/configz                every VirtualService and DestinationRule, applied or refused and why
func (p *Primary) Handler(gatherer prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !p.Ready() {
			http.Error(w, "not ready: waiting for the first sync of local and remote clusters", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ok\n"))
	})
	if gatherer != nil {
		mux.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	}
	mux.HandleFunc("/debug/clusterz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, ClusterzResponse{Cluster: string(p.cfg.ClusterID), StaleWindow: p.cfg.StaleWindow.String(), Ready: p.Ready(), Clusters: p.clusters.Statuses(), Proxies: p.SecureProxies()})
	})
	mux.HandleFunc("/debug/configz", p.serveConfigz)
	mux.HandleFunc("/debug/registryz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, p.reg.View())
	})
	mux.HandleFunc("/debug/proxyz", func(w http.ResponseWriter, _ *http.Request) {
		p.mu.Lock()
		proxies := make([]Proxy, 0, len(p.streams))
		for _, pr := range p.streams {
			if !slices.Contains(proxies, pr) {
				proxies = append(proxies, pr)
			}
		}
		p.mu.Unlock()
		proxies = append(proxies, p.SecureProxies()...)
		sort.Slice(proxies, func(i, j int) bool { return proxies[i].ID < proxies[j].ID })
		writeJSON(w, proxies)
	})
	mux.HandleFunc("/debug/config_dump", p.configDump)
	return mux
}

// configDump serves one view's resources as the proxies of that view receive them, by
// ?proxy=<node ID> (the view of a connected proxy) or ?view=<kind>/<network>[@<locality>][~<namespace>]. It reads
// the cache's marshalled bytes, so it shows exactly what was sent, not a rebuild.
func (p *Primary) configDump(w http.ResponseWriter, r *http.Request) {
	key := r.URL.Query().Get("view")
	if id := r.URL.Query().Get("proxy"); id != "" {
		p.mu.Lock()
		for _, pr := range p.streams {
			if pr.ID == id {
				key = pr.Key().String()
			}
		}
		p.mu.Unlock()
		for _, pr := range p.SecureProxies() {
			if pr.ID == id {
				key = pr.Key().String()
			}
		}
		if key == "" {
			http.Error(w, "no connected proxy "+id+"; see /debug/proxyz", http.StatusNotFound)
			return
		}
	}
	if key == "" {
		http.Error(w, "give ?proxy=<node ID> or ?view=<kind>/<network>", http.StatusBadRequest)
		return
	}
	vk, err := ParseViewKey(key)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	dump, ok := p.cache.Dump(vk)
	if !ok {
		http.Error(w, "no configuration for view "+key+" (no proxy has asked for it yet); see /debug/proxyz", http.StatusNotFound)
		return
	}
	out := map[string]any{"view": key}
	for typ, list := range dump {
		items := make([]json.RawMessage, 0, len(list))
		for _, a := range list {
			if b, err := protojson.Marshal(a); err == nil {
				items = append(items, b)
			}
		}
		out[typ] = items
	}
	writeJSON(w, out)
}

// writeJSON writes v as indented JSON, for people and `isthmus status` alike. An encode
// error can only be a broken connection, and there is no one left to tell.
func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
