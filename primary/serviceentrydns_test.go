package primary

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
)

// dnsEntry resolves its endpoints' names (one an IP, written as is) and dnsHostsEntry,
// without endpoints, its hosts.
const (
	dnsEntry = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop, resourceVersion: "7"}
spec:
  hosts: [db.shop.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 5432, name: tcp-db, protocol: TCP}]
  endpoints:
  - {address: primary.db.example, labels: {role: primary}, locality: r1/z1}
  - {address: replica.db.example, labels: {role: replica}}
  - {address: 192.0.2.50, labels: {role: replica}}
`
	dnsHostsEntry = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop, resourceVersion: "8"}
spec:
  hosts: [api.example.org]
  resolution: DNS_ROUND_ROBIN
  ports: [{number: 443, name: grpc, protocol: GRPC, targetPort: 8443}]
`
)

// TestServiceEntryDNS checks how resolved names become endpoints: each address of a
// name is an endpoint with the name's labels, ports and locality; an IP is used as
// written; a name resolving to an address another already has adds none; an entry
// without endpoints resolves its hosts; and names not resolved yet, or failing, leave
// the entry applied with a warning and without their endpoints.
func TestServiceEntryDNS(t *testing.T) {
	table := map[string]dnsResult{
		"primary.db.example": {addrs: []netip.Addr{netip.MustParseAddr("198.51.100.1")}},
		"replica.db.example": {addrs: []netip.Addr{netip.MustParseAddr("192.0.2.50"), netip.MustParseAddr("198.51.100.2")}},
		"api.example.org":    {err: errors.New("lookup api.example.org: server misbehaving")},
	}
	lookup := func(name string) ([]netip.Addr, error, bool) {
		r, ok := table[name]
		return r.addrs, r.err, ok
	}
	ses := []*networkingv1.ServiceEntry{mustSE(t, dnsEntry), mustSE(t, dnsHostsEntry)}
	p := planServiceEntries("c1", "cluster.local", ses, lookup)
	if d := cmp.Diff([]string{"api.example.org", "primary.db.example", "replica.db.example"}, p.names); d != "" {
		t.Errorf("names to resolve (-want +got):\n%s", d)
	}
	for _, st := range p.status {
		if !st.Applied {
			t.Fatalf("refused: %+v", st)
		}
	}
	type ep struct {
		addr, role, loc string
		port            uint16
	}
	var got []ep
	for _, e := range p.shard.Endpoints["db.shop.example"] {
		got = append(got, ep{e.Address.String(), e.Labels["role"], e.Locality.String(), e.Ports[0].Number})
	}
	want := []ep{
		{"192.0.2.50", "replica", "", 5432}, // the replica name's first address; the IP endpoint adds no second
		{"198.51.100.1", "primary", "r1/z1", 5432},
		{"198.51.100.2", "replica", "", 5432},
	}
	if d := cmp.Diff(want, got, cmp.AllowUnexported(ep{})); d != "" {
		t.Errorf("db endpoints (-want +got):\n%s", d)
	}
	if eps := p.shard.Endpoints["api.example.org"]; len(eps) != 0 {
		t.Errorf("api endpoints %v; its lookup failed", eps)
	}
	if w := strings.Join(p.status[1].Warnings, "\n"); !strings.Contains(w, "server misbehaving") || !strings.Contains(w, "DNS_ROUND_ROBIN") {
		t.Errorf("api warnings %q; want the lookup error and the round-robin note", w)
	}
	// Nothing resolved yet: applied, no endpoints, a warning per name.
	p = planServiceEntries("c1", "cluster.local", ses[:1], func(string) ([]netip.Addr, error, bool) { return nil, nil, false })
	if !p.status[0].Applied || len(p.shard.Endpoints["db.shop.example"]) != 1 || !strings.Contains(strings.Join(p.status[0].Warnings, " "), "not resolved yet") {
		t.Errorf("unresolved: status %+v endpoints %v; want applied, only the IP endpoint, a warning", p.status[0], p.shard.Endpoints["db.shop.example"])
	}
	// The same names resolved the other way round make the same shard (sorted).
	table["api.example.org"] = dnsResult{addrs: []netip.Addr{netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("203.0.113.7")}}
	p = planServiceEntries("c1", "cluster.local", ses, lookup)
	var api []string
	for _, e := range p.shard.Endpoints["api.example.org"] {
		api = append(api, netip.AddrPortFrom(e.Address, e.Ports[0].Number).String())
	}
	if d := cmp.Diff([]string{"203.0.113.7:8443", "[2001:db8::1]:8443"}, api); d != "" {
		t.Errorf("api endpoints from its host (-want +got):\n%s", d)
	}
}

// fakeLookup answers from a table the test changes, counting lookups per name.
type fakeLookup struct {
	mu    sync.Mutex
	addrs map[string][]netip.Addr
	errs  map[string]error
	calls map[string]int
}

func (f *fakeLookup) lookup(_ context.Context, name string) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[name]++
	return slices.Clone(f.addrs[name]), f.errs[name]
}

func (f *fakeLookup) set(name string, err error, addrs ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.addrs[name] = nil
	for _, a := range addrs {
		f.addrs[name] = append(f.addrs[name], netip.MustParseAddr(a))
	}
	f.errs[name] = err
}

// TestEntryResolver checks the resolver's rules: a wanted name is looked up at once and
// signals a change; a refresh finds a changed answer; a failing lookup keeps the last
// addresses; "no such host" removes them; a name no longer wanted is forgotten.
func TestEntryResolver(t *testing.T) {
	f := &fakeLookup{addrs: map[string][]netip.Addr{}, errs: map[string]error{}, calls: map[string]int{}}
	r := newEntryResolver(nil, 50*time.Millisecond)
	r.lookup = f.lookup
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { defer close(done); r.run(ctx) }()
	defer func() { cancel(); <-done }()
	waitAddrs := func(what, name string, want ...string) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; {
			addrs, _, ok := r.result(name)
			var got []string
			for _, a := range addrs {
				got = append(got, a.String())
			}
			if ok && slices.Equal(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s resolves to %v (known %v); want %v", what, name, got, ok, want)
			}
			select {
			case <-r.Changed():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	f.set("a.example", nil, "::ffff:192.0.2.2", "192.0.2.1")
	r.setWanted([]string{"a.example"})
	waitAddrs("first lookup", "a.example", "192.0.2.1", "192.0.2.2")
	f.set("a.example", nil, "192.0.2.3")
	waitAddrs("refreshed", "a.example", "192.0.2.3")
	f.set("a.example", &net.DNSError{Err: "i/o timeout", Name: "a.example", IsTimeout: true})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err, _ := r.result("a.example"); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the failing lookup was never recorded")
		}
	}
	waitAddrs("a failed lookup keeps the last answer", "a.example", "192.0.2.3")
	f.set("a.example", &net.DNSError{Err: "no such host", Name: "a.example", IsNotFound: true})
	waitAddrs("no such host removes the addresses", "a.example")
	r.setWanted(nil)
	if _, _, ok := r.result("a.example"); ok {
		t.Error("a name no longer wanted is still known")
	}
}

// TestServiceEntryDNSInRegistry puts a resolved entry through the registry and the
// builder: the resolved addresses are the cluster's EDS, and a subset selects by the
// endpoint's labels.
func TestServiceEntryDNSInRegistry(t *testing.T) {
	lookup := func(name string) ([]netip.Addr, error, bool) {
		return map[string][]netip.Addr{"primary.db.example": {netip.MustParseAddr("198.51.100.1")},
			"replica.db.example": {netip.MustParseAddr("198.51.100.2")}}[name], nil, true
	}
	p := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, dnsEntry)}, lookup)
	r := NewRegistry()
	r.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: "c1"}, p.shard)
	tc := newTrafficConfig("cluster.local", nil, []*networkingv1.DestinationRule{mustDR(t, `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db.shop.example
  subsets: [{name: primary, labels: {role: primary}}]
`)})
	tc.ServiceEntries = p.status
	r.SetTrafficConfig(tc)
	res, err := BuildResources(r.View(), ViewKey{Kind: ProxySidecar, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	got := endpointsByCluster(res)
	want := map[string][]string{
		"outbound|5432||db.shop.example":        {"192.0.2.50:5432", "198.51.100.1:5432", "198.51.100.2:5432"},
		"outbound|5432|primary|db.shop.example": {"198.51.100.1:5432"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("EDS (-want +got):\n%s", d)
	}
}

// endpointsByCluster returns each load assignment's addresses (address:port, sorted) by
// cluster name, leaving out empty ones.
func endpointsByCluster(res Resources) map[string][]string {
	out := map[string][]string{}
	for _, r := range res[resource.EndpointType] {
		cla := r.(*endpoint.ClusterLoadAssignment)
		for _, l := range cla.Endpoints {
			for _, e := range l.LbEndpoints {
				sa := e.GetEndpoint().GetAddress().GetSocketAddress()
				ap := netip.AddrPortFrom(netip.MustParseAddr(sa.GetAddress()), uint16(sa.GetPortValue()))
				out[cla.ClusterName] = append(out[cla.ClusterName], ap.String())
			}
		}
		slices.Sort(out[cla.ClusterName])
	}
	return out
}
