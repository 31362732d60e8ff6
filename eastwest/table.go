package eastwest

import (
	"net/netip"
	"sync"
	"sync/atomic"
)

// Table maps cluster names (outbound|<port>|<subset>|<host>) to the endpoints on the
// gateway's own network. Updates replace the whole map; lookups never block on them.
type Table struct {
	m    atomic.Pointer[map[string][]netip.AddrPort]
	next sync.Map // cluster name → *atomic.Uint64, round-robin position
}

// Update replaces the routes.
func (t *Table) Update(routes map[string][]netip.AddrPort) {
	cp := make(map[string][]netip.AddrPort, len(routes))
	for k, v := range routes {
		cp[k] = append([]netip.AddrPort(nil), v...)
	}
	t.m.Store(&cp)
}

// Endpoints returns the endpoints of a cluster in round-robin order, starting at the next
// position, so that retries walk the other endpoints.
func (t *Table) Endpoints(cluster string) []netip.AddrPort {
	mp := t.m.Load()
	if mp == nil {
		return nil
	}
	eps := (*mp)[cluster]
	if len(eps) == 0 {
		return nil
	}
	c, _ := t.next.LoadOrStore(cluster, new(atomic.Uint64))
	start := int(c.(*atomic.Uint64).Add(1) % uint64(len(eps)))
	out := make([]netip.AddrPort, 0, len(eps))
	out = append(out, eps[start:]...)
	return append(out, eps[:start]...)
}

// Len returns the number of clusters routed.
func (t *Table) Len() int {
	mp := t.m.Load()
	if mp == nil {
		return 0
	}
	return len(*mp)
}
