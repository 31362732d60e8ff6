package proxy

import (
	"slices"
	"time"
)

// Status is what the proxy serves now, for readiness, /debug/config and the CLI.
type Status struct {
	// Applied is when the current snapshot was applied; zero before the first.
	Applied time.Time `json:"applied,omitzero"`
	// Listeners are the configured listeners by name, each with its port and whether its
	// socket is open.
	Listeners []ListenerStatus `json:"listeners"`
	// Routes, Clusters and Secrets are the names in force; Endpoints counts each
	// cluster's endpoints.
	Routes    []string       `json:"routes"`
	Clusters  []string       `json:"clusters"`
	Endpoints map[string]int `json:"endpoints"`
	Secrets   []string       `json:"secrets"`
}

// ListenerStatus is one configured listener.
type ListenerStatus struct {
	Name string `json:"name"`
	Port uint16 `json:"port"`
	Open bool   `json:"open"`
}

// Ready reports whether a configuration with at least one listener is in force and
// every configured listener's socket is open: only then can the proxy be sent traffic.
func (s Status) Ready() bool {
	if len(s.Listeners) == 0 {
		return false
	}
	for _, l := range s.Listeners {
		if !l.Open {
			return false
		}
	}
	return true
}

// Status returns what the proxy serves now. Secrets are listed by name only.
func (p *Proxy) Status() Status {
	s := p.snap.Load()
	st := Status{Endpoints: map[string]int{}}
	p.mu.Lock()
	st.Applied = p.applied
	for name, l := range s.Listeners {
		ps, open := p.listeners[l.Port]
		st.Listeners = append(st.Listeners, ListenerStatus{Name: name, Port: l.Port, Open: open && ps.name == name})
	}
	p.mu.Unlock()
	slices.SortFunc(st.Listeners, func(a, b ListenerStatus) int { return int(a.Port) - int(b.Port) })
	for name := range s.Routes {
		st.Routes = append(st.Routes, name)
	}
	for name := range s.Clusters {
		st.Clusters = append(st.Clusters, name)
		st.Endpoints[name] = len(s.Endpoints[name])
	}
	for name := range s.Secrets {
		st.Secrets = append(st.Secrets, name)
	}
	for name := range s.ClientCAs {
		st.Secrets = append(st.Secrets, name)
	}
	slices.Sort(st.Routes)
	slices.Sort(st.Clusters)
	slices.Sort(st.Secrets)
	return st
}
