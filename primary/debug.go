package primary

import (
	"encoding/json"
	"net/http"
	"slices"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// ClusterzResponse is the body of /debug/clusterz (also what `isthmus status` reads).
type ClusterzResponse struct {
	Cluster     string          `json:"cluster"`     // the primary's own cluster
	StaleWindow string          `json:"staleWindow"` // the link-health policy in force
	Ready       bool            `json:"ready"`
	Clusters    []ClusterStatus `json:"clusters"`
}

// Handler serves /readyz, /metrics and the debug endpoints:
//
//	/debug/clusterz               every cluster's link state, staleness and error
//	/debug/registryz              the merged registry view
//	/debug/config_dump?proxy=ID   the resources a connected proxy receives
//	/debug/config_dump?view=K     the same for a view key, e.g. grpc/network-1
//	/debug/proxyz                 connected proxies and their views
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
		writeJSON(w, ClusterzResponse{Cluster: string(p.cfg.ClusterID), StaleWindow: p.cfg.StaleWindow.String(), Ready: p.Ready(), Clusters: p.clusters.Statuses()})
	})
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
		sort.Slice(proxies, func(i, j int) bool { return proxies[i].ID < proxies[j].ID })
		writeJSON(w, proxies)
	})
	mux.HandleFunc("/debug/config_dump", p.configDump)
	return mux
}

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
		if key == "" {
			http.Error(w, "no connected proxy "+id+"; see /debug/proxyz", http.StatusNotFound)
			return
		}
	}
	if key == "" {
		http.Error(w, "give ?proxy=<node ID> or ?view=<kind>/<network>", http.StatusBadRequest)
		return
	}
	var vk ViewKey
	kind, network, _ := strings.Cut(key, "/")
	vk.Kind, vk.Network = ProxyKind(kind), mesh.NetworkID(network)
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

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
