package eastwest

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Table maps xDS cluster names to the endpoints on the gateway's own network. It is
// filled with whatever clusters the primary's gateway view holds and looked up by the
// service port a connection's SNI names (mesh.OutboundName, whose ClusterName is the
// primary's name for that port). Updates replace the whole map; lookups never block on
// them and are safe from any number of goroutines.
type Table struct {
	// m is the current map; it is never modified after it is stored, only replaced.
	m atomic.Pointer[map[string][]netip.AddrPort]
	// next holds, per cluster name, a *atomic.Uint64 round-robin position. Entries of
	// clusters that went away stay: a position costs 8 bytes and keeps a returning
	// cluster's rotation going.
	next sync.Map
}

// Update replaces the routes, keyed by xDS cluster name (outbound|<port>|<subset>|<host>).
// It copies routes, so the caller may keep changing its map.
func (t *Table) Update(routes map[string][]netip.AddrPort) {
	cp := make(map[string][]netip.AddrPort, len(routes))
	for k, v := range routes {
		cp[k] = append([]netip.AddrPort(nil), v...)
	}
	t.m.Store(&cp)
}

// Endpoints returns the endpoints of the service port n names, in round-robin order
// starting at the next position, so that retries walk the other endpoints. It returns nil
// when the port has no endpoints on this network. The slice is the caller's.
func (t *Table) Endpoints(n mesh.OutboundName) []netip.AddrPort {
	cluster := n.ClusterName()
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

// Has reports whether the primary's view names the cluster of n, with or without
// endpoints on this network.
func (t *Table) Has(n mesh.OutboundName) bool {
	mp := t.m.Load()
	if mp == nil {
		return false
	}
	_, ok := (*mp)[n.ClusterName()]
	return ok
}

// Len returns the number of clusters routed.
func (t *Table) Len() int {
	mp := t.m.Load()
	if mp == nil {
		return 0
	}
	return len(*mp)
}
