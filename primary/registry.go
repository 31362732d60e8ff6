package primary

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// SourceKubernetes is the source name of shards filled by cluster watchers.
const SourceKubernetes = "kubernetes"

// ShardKey names one source's view of one cluster. Every shard is written by exactly one
// writer (a cluster watcher, later a federation import).
type ShardKey struct {
	Source  string
	Cluster mesh.ClusterID
}

// String returns "source/cluster".
func (k ShardKey) String() string { return k.Source + "/" + string(k.Cluster) }

// ServicePort is one port of a service.
type ServicePort struct {
	Name     string
	Port     uint16
	Protocol mesh.Protocol
}

// Service is one cluster's definition of a service.
type Service struct {
	Hostname mesh.Hostname
	Key      mesh.ServiceKey
	VIP      netip.Addr // the ClusterIP; invalid for headless services
	Ports    []ServicePort
	// Identities and TrustDomain, when set (imports from peer meshes), are what a
	// client requires of the server's certificate: one of Identities, or with none any
	// identity of TrustDomain (serverSANs). Zero for local services: the chain alone.
	Identities  []mesh.Identity
	TrustDomain mesh.TrustDomain
}

// Gateway is a network's east-west gateway address.
type Gateway struct {
	Network mesh.NetworkID
	Address netip.Addr
	Port    uint16
	Cluster mesh.ClusterID // where it was discovered ("" when configured)
}

// ShardData is the complete content of one shard.
type ShardData struct {
	Services  map[mesh.Hostname]*Service
	Endpoints map[mesh.Hostname][]mesh.Endpoint
	Gateways  []Gateway
}

// Registry holds every shard and merges them into Views. It is safe for concurrent use;
// writers never block on readers for longer than a map update.
type Registry struct {
	changed chan struct{}

	mu sync.Mutex
	// shards is guarded by mu; ShardData values are never mutated after they are stored.
	shards  map[ShardKey]*ShardData
	version uint64 // guarded by mu; bumped on every change
	// gens counts changes per hostname and gwGen changes to gateways, so that View merges,
	// and the snapshot builder rebuilds, only what changed; guarded by mu.
	gens  map[mesh.Hostname]uint64
	gwGen uint64
	// merged caches the last merge of each hostname at the generation it was built at;
	// guarded by mu.
	merged map[mesh.Hostname]*MergedService
	// traffic is the Istio traffic configuration (SetTrafficConfig), changed at
	// trafficGen; guarded by mu.
	traffic    *TrafficConfig
	trafficGen uint64
	// security is the Istio security configuration (SetSecurityConfig), changed at
	// securityGen; guarded by mu.
	security    *SecurityConfig
	securityGen uint64
	// exports is what this mesh exports to peer meshes (SetFederationExports), changed
	// at exportsGen; guarded by mu.
	exports    FederationExports
	exportsGen uint64
	// ingress is the Gateways and the Secrets their servers may name
	// (SetIngressConfig), changed at ingressGen; guarded by mu.
	ingress    *IngressConfig
	ingressGen uint64
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{
		changed: make(chan struct{}, 1),
		shards:  map[ShardKey]*ShardData{},
		gens:    map[mesh.Hostname]uint64{},
		merged:  map[mesh.Hostname]*MergedService{},
	}
}

// Changed receives a value after one or more changes (coalesced); readers then call View.
func (r *Registry) Changed() <-chan struct{} { return r.changed }

// touchLocked records that host changed.
func (r *Registry) touchLocked(host mesh.Hostname) {
	r.version++
	r.gens[host] = r.version
}

// touchShardLocked records that every hostname of old and next may have changed, and the
// gateways if they differ.
func (r *Registry) touchShardLocked(old, next *ShardData) {
	for _, d := range []*ShardData{old, next} {
		if d == nil {
			continue
		}
		for h := range d.Services {
			r.touchLocked(h)
		}
		for h := range d.Endpoints {
			r.touchLocked(h)
		}
	}
	if !slices.Equal(old.gatewaysOrNil(), next.gatewaysOrNil()) {
		r.version++
		r.gwGen = r.version
	}
}

// notifyLocked bumps the version and wakes the reader of Changed without blocking: the
// channel holds one pending signal, so any number of changes before a read coalesce
// into one push.
func (r *Registry) notifyLocked() {
	r.version++
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// ReplaceShard sets the whole content of a shard at once, so that readers never see a
// cluster half-built. A nil data removes the shard.
func (r *Registry) ReplaceShard(key ShardKey, data *ShardData) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old, ok := r.shards[key]
	if data == nil {
		if !ok {
			return
		}
		delete(r.shards, key)
	} else {
		r.shards[key] = data
	}
	r.touchShardLocked(old, data)
	r.notifyLocked()
}

// UpdateService sets (or, with svc nil, deletes) one service of a shard together with its
// endpoints, copying the shard's maps so that earlier Views stay unchanged.
func (r *Registry) UpdateService(key ShardKey, host mesh.Hostname, svc *Service, eps []mesh.Endpoint) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.shards[key]
	next := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
	if old != nil {
		for h, s := range old.Services {
			next.Services[h] = s
		}
		for h, e := range old.Endpoints {
			next.Endpoints[h] = e
		}
		next.Gateways = old.Gateways
	}
	if svc == nil {
		delete(next.Services, host)
		delete(next.Endpoints, host)
	} else {
		next.Services[host] = svc
		next.Endpoints[host] = eps
	}
	r.shards[key] = next
	r.touchLocked(host)
	r.notifyLocked()
}

// UpdateEndpoints sets the endpoints a shard has for hosts it defines no Service for
// (pods a ServiceEntry's workloadSelector selects: the entry's shard defines the
// service); a nil or empty slice removes the host's endpoints. The shard's maps are
// copied, so earlier Views stay unchanged.
func (r *Registry) UpdateEndpoints(key ShardKey, eps map[mesh.Hostname][]mesh.Endpoint) {
	if len(eps) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.shards[key]
	next := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
	if old != nil {
		maps.Copy(next.Services, old.Services)
		maps.Copy(next.Endpoints, old.Endpoints)
		next.Gateways = old.Gateways
	}
	for h, e := range eps {
		if len(e) == 0 {
			delete(next.Endpoints, h)
		} else {
			next.Endpoints[h] = e
		}
		r.touchLocked(h)
	}
	r.shards[key] = next
	r.notifyLocked()
}

// UpdateGateways sets the gateways a shard discovered.
func (r *Registry) UpdateGateways(key ShardKey, gws []Gateway) {
	r.mu.Lock()
	defer r.mu.Unlock()
	old := r.shards[key]
	next := &ShardData{}
	if old != nil {
		*next = *old
	}
	next.Gateways = gws
	r.shards[key] = next
	r.touchShardLocked(&ShardData{Gateways: old.gatewaysOrNil()}, &ShardData{Gateways: gws})
	r.notifyLocked()
}

// Shard returns the current content of a shard (nil when absent). The result must not be
// modified.
func (r *Registry) Shard(key ShardKey) *ShardData {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.shards[key]
}

// View is an immutable merged picture of the registry.
type View struct {
	Version uint64
	// GatewaysGen changes whenever Gateways do.
	GatewaysGen uint64
	Services    []*MergedService // sorted by hostname
	// Gateways by network, from every shard plus configured ones.
	Gateways map[mesh.NetworkID][]Gateway
	// Traffic is the Istio traffic configuration (nil when none is read); TrafficGen
	// changes whenever it does.
	Traffic    *TrafficConfig `json:"-"` // on /debug/configz, not /debug/registryz
	TrafficGen uint64
	// Security is the Istio security configuration (nil when none is read); SecurityGen
	// changes whenever it does.
	Security    *SecurityConfig `json:"-"` // on /debug/configz
	SecurityGen uint64
	// Exports is what this mesh exports to peer meshes (the zero value when it is not
	// federated); ExportsGen changes whenever it does.
	Exports    FederationExports
	ExportsGen uint64
	// Ingress is the Gateways and the Secrets their servers may name (nil when none are
	// read; ingress.go); IngressGen changes whenever it does.
	Ingress    *IngressConfig `json:"-"`
	IngressGen uint64
}

// MergedService is one hostname across every cluster that has it ("namespace sameness").
type MergedService struct {
	// Gen changes whenever anything about the hostname changes in any shard; equal Gens
	// mean equal content. MergedService values are shared between Views and never mutated.
	Gen      uint64
	Hostname mesh.Hostname
	Key      mesh.ServiceKey
	// Ports is the union of the clusters' ports by number, sorted; on a name clash the
	// first cluster in ID order wins.
	Ports     []ServicePort
	VIPs      map[mesh.ClusterID]netip.Addr
	Endpoints []mesh.Endpoint // from every shard, sorted by cluster then address
	// Identities and TrustDomain are the first defining shard's (Service).
	Identities  []mesh.Identity
	TrustDomain mesh.TrustDomain
}

// Service returns the merged service with hostname h, or nil.
func (v *View) Service(h mesh.Hostname) *MergedService {
	i, ok := slices.BinarySearchFunc(v.Services, h, func(s *MergedService, h mesh.Hostname) int { return cmp.Compare(s.Hostname, h) })
	if !ok {
		return nil
	}
	return v.Services[i]
}

// View merges all shards. Endpoints whose hostname has no Service in any shard are left
// out: a service exists in the mesh only where some cluster defines it. Only hostnames
// that changed since the last View are merged again; the others are shared.
func (r *Registry) View() *View {
	r.mu.Lock()
	defer r.mu.Unlock()
	keys := make([]ShardKey, 0, len(r.shards))
	for k := range r.shards {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b ShardKey) int {
		return cmp.Or(cmp.Compare(a.Cluster, b.Cluster), cmp.Compare(a.Source, b.Source))
	})
	v := &View{Version: r.version, GatewaysGen: r.gwGen, Gateways: map[mesh.NetworkID][]Gateway{}, Traffic: r.traffic, TrafficGen: r.trafficGen}
	v.Security, v.SecurityGen = r.security, r.securityGen
	v.Exports, v.ExportsGen = r.exports, r.exportsGen
	v.Ingress, v.IngressGen = r.ingress, r.ingressGen
	for _, k := range keys {
		for _, g := range r.shards[k].Gateways {
			v.Gateways[g.Network] = append(v.Gateways[g.Network], g)
		}
	}
	for n, gws := range v.Gateways {
		slices.SortFunc(gws, func(a, b Gateway) int { return cmp.Or(a.Address.Compare(b.Address), cmp.Compare(a.Port, b.Port)) })
		v.Gateways[n] = slices.CompactFunc(gws, func(a, b Gateway) bool { return a.Address == b.Address && a.Port == b.Port })
	}
	for host, gen := range r.gens {
		if m := r.merged[host]; m != nil && m.Gen == gen {
			v.Services = append(v.Services, m)
			continue
		}
		m := r.mergeLocked(host, gen, keys)
		if m == nil {
			delete(r.merged, host)
			delete(r.gens, host) // gone from every shard
			continue
		}
		r.merged[host] = m
		v.Services = append(v.Services, m)
	}
	slices.SortFunc(v.Services, func(a, b *MergedService) int { return cmp.Compare(a.Hostname, b.Hostname) })
	return v
}

// mergeLocked merges one hostname across shards (in cluster order), or returns nil when no
// shard defines a Service for it.
func (r *Registry) mergeLocked(host mesh.Hostname, gen uint64, keys []ShardKey) *MergedService {
	var m *MergedService
	for _, k := range keys {
		svc := r.shards[k].Services[host]
		if svc == nil {
			continue
		}
		if m == nil {
			m = &MergedService{Gen: gen, Hostname: host, Key: svc.Key, VIPs: map[mesh.ClusterID]netip.Addr{},
				Identities: svc.Identities, TrustDomain: svc.TrustDomain}
		}
		if svc.VIP.IsValid() {
			m.VIPs[k.Cluster] = svc.VIP
		}
		for _, p := range svc.Ports {
			if !slices.ContainsFunc(m.Ports, func(q ServicePort) bool { return q.Port == p.Port }) {
				m.Ports = append(m.Ports, p)
			}
		}
	}
	if m == nil {
		return nil
	}
	// One allocation for every shard's endpoints, and no sort when they arrive in order:
	// keys are in cluster order and a watcher's endpoints are its cluster's, sorted by
	// address, so the concatenation usually is sorted already (with 1,000 clusters the
	// growing appends and the sort of 10,000 endpoints were a third of a push's CPU).
	n := 0
	for _, k := range keys {
		n += len(r.shards[k].Endpoints[host])
	}
	m.Endpoints = make([]mesh.Endpoint, 0, n)
	for _, k := range keys {
		m.Endpoints = append(m.Endpoints, r.shards[k].Endpoints[host]...)
	}
	slices.SortFunc(m.Ports, func(a, b ServicePort) int { return cmp.Compare(a.Port, b.Port) })
	byClusterAddress := func(a, b mesh.Endpoint) int {
		return cmp.Or(cmp.Compare(a.Cluster, b.Cluster), a.Address.Compare(b.Address))
	}
	if !slices.IsSortedFunc(m.Endpoints, byClusterAddress) {
		slices.SortFunc(m.Endpoints, byClusterAddress)
	}
	return m
}

// EndpointCount returns how many endpoints a shard holds.
func (d *ShardData) EndpointCount() int {
	if d == nil {
		return 0
	}
	n := 0
	for _, eps := range d.Endpoints {
		n += len(eps)
	}
	return n
}
