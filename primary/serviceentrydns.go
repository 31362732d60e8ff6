package primary

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// entryResolver looks up the DNS names of resolution-DNS ServiceEntries for the config
// watcher: the primary resolves them and serves the addresses in EDS, so both clients
// get the same endpoints, subsets and locality priorities over them work as for static
// endpoints, and proxyless gRPC (whose xDS client takes addresses, not names, in EDS)
// reaches them. Each name is looked up as soon as it is wanted and again every refresh;
// a failed lookup keeps the addresses found before (as Envoy keeps a DNS cluster's
// hosts), so a DNS outage removes no endpoints; "no such host" is an answer, and
// removes them.
type entryResolver struct {
	lookup  func(ctx context.Context, host string) ([]netip.Addr, error)
	refresh time.Duration
	timeout time.Duration // per lookup

	mu      sync.Mutex
	want    map[string]bool
	results map[string]dnsResult
	kick    chan struct{} // buffered 1: new names are wanted
	changed chan struct{} // buffered 1: some result changed
}

// dnsResult is the last lookup of one name.
type dnsResult struct {
	addrs []netip.Addr // sorted; kept from an earlier lookup when the last one failed
	err   error        // the last lookup's error
}

// newEntryResolver returns a resolver using r (net.DefaultResolver when nil).
func newEntryResolver(r *net.Resolver, refresh time.Duration) *entryResolver {
	if r == nil {
		r = net.DefaultResolver
	}
	return &entryResolver{
		lookup:  func(ctx context.Context, host string) ([]netip.Addr, error) { return r.LookupNetIP(ctx, "ip", host) },
		refresh: refresh, timeout: 5 * time.Second,
		want: map[string]bool{}, results: map[string]dnsResult{},
		kick: make(chan struct{}, 1), changed: make(chan struct{}, 1),
	}
}

// result is an entryLookup over the last results.
func (r *entryResolver) result(name string) ([]netip.Addr, error, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	res, ok := r.results[name]
	return res.addrs, res.err, ok
}

// setWanted replaces the names to keep resolving; new ones are looked up at once, names
// no longer wanted are forgotten.
func (r *entryResolver) setWanted(names []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	next := map[string]bool{}
	fresh := false
	for _, n := range names {
		next[n] = true
		fresh = fresh || !r.want[n]
	}
	for n := range r.results {
		if !next[n] {
			delete(r.results, n)
		}
	}
	r.want = next
	if fresh {
		select {
		case r.kick <- struct{}{}:
		default:
		}
	}
}

// Changed receives a value after some name's addresses changed (coalesced).
func (r *entryResolver) Changed() <-chan struct{} { return r.changed }

// run resolves the wanted names until ctx ends: the new ones when kicked, all of them
// every refresh.
func (r *entryResolver) run(ctx context.Context) {
	t := time.NewTicker(r.refresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
			r.resolve(ctx, true)
		case <-t.C:
			r.resolve(ctx, false)
		}
	}
}

// resolve looks up the wanted names (only those without a result when onlyNew) and
// signals Changed when any result differs.
func (r *entryResolver) resolve(ctx context.Context, onlyNew bool) {
	r.mu.Lock()
	var names []string
	for n := range r.want {
		if _, ok := r.results[n]; !ok || !onlyNew {
			names = append(names, n)
		}
	}
	r.mu.Unlock()
	slices.Sort(names)
	changed := false
	for _, n := range names {
		lctx, cancel := context.WithTimeout(ctx, r.timeout)
		addrs, err := r.lookup(lctx, n)
		cancel()
		if ctx.Err() != nil {
			return
		}
		for i := range addrs {
			addrs[i] = addrs[i].Unmap()
		}
		slices.SortFunc(addrs, func(a, b netip.Addr) int { return a.Compare(b) })
		addrs = slices.Compact(addrs)
		r.mu.Lock()
		if r.want[n] {
			old, had := r.results[n]
			next := dnsResult{addrs: addrs, err: err}
			var dnsErr *net.DNSError
			if err != nil && len(old.addrs) > 0 && (!errors.As(err, &dnsErr) || !dnsErr.IsNotFound) {
				next.addrs = old.addrs // keep the last good answer; "no such host" is an answer
			}
			if !had || !slices.Equal(old.addrs, next.addrs) || (old.err == nil) != (next.err == nil) {
				changed = true
			}
			r.results[n] = next
		}
		r.mu.Unlock()
	}
	if changed {
		select {
		case r.changed <- struct{}{}:
		default:
		}
	}
}
