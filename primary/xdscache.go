package primary

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// viewCache is the primary's xDS cache (a go-control-plane cache.Cache). It holds one set
// of resources per view, each resource marshalled once when the view is set; every
// response to every proxy of the view shares those bytes, so a push costs one marshal per
// changed resource, not one per proxy (go-control-plane's SnapshotCache marshals per
// response).
//
// Versions are content hashes: a resource's version is the hash of its bytes, and a
// state-of-the-world response's version is the hash of exactly what it returned. So a push
// that leaves a proxy's resources unchanged sends that proxy nothing, and the version a
// proxy ACKs says precisely what it has.
type viewCache struct {
	// onNewView is called (under the cache's lock; it must not block) the first time a
	// proxy asks for a view, so that the primary builds it.
	onNewView func(ViewKey)
	// keyOf returns the view of a proxy's node (viewKeyOf, or the primary's
	// workloadViewKey, which also reads the pod and the Sidecars); it must not block.
	keyOf func(*core.Node) (ViewKey, error)

	// mu guards views (and everything reachable from them), watchAt and nextID. SetView
	// marshals and sends outside it (a stream may be waiting for mu in CreateWatch while
	// its channel is full); only openWatch answers under it, where the channel has room.
	mu    sync.Mutex
	views map[ViewKey]*viewState
	// watchAt is the view each parked watch is in (rekey moves watches between views).
	watchAt map[int64]ViewKey
	nextID  int64 // the ID of the next watch, its key in viewState's watch maps
}

// viewState is one view's resources and the watches waiting on it.
type viewState struct {
	types  map[string]*typeResources      // by type URL
	byRes  map[types.Resource]*marshalled // the same, by resource value, for reuse
	sotw   map[int64]*sotwWatch
	deltas map[int64]*deltaWatch
}

// typeResources are the marshalled resources of one type.
type typeResources struct {
	byName map[string]*marshalled
	all    string // hash over every resource, the version of a wildcard response
}

// marshalled is one resource as it goes on the wire. Values are immutable once made and
// shared by every response that carries the resource.
type marshalled struct {
	name    string
	version string // hash of the bytes
	any     *anypb.Any
}

// sotwWatch is a parked state-of-the-world request: it is answered (once) by the first
// SetView that changes what it would receive, then removed.
type sotwWatch struct {
	req *discovery.DiscoveryRequest
	sub cache.Subscription
	ch  chan cache.Response
}

// deltaWatch is a parked incremental request, answered like a sotwWatch.
type deltaWatch struct {
	req *discovery.DeltaDiscoveryRequest
	sub cache.Subscription
	ch  chan cache.DeltaResponse
}

// pushOrder is the order watches are answered in on a push: clusters before their
// endpoints, listeners before their routes, so that an Envoy never references what it
// does not yet have (make before break).
var pushOrder = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType, resource.SecretType}

// newViewCache returns an empty cache; onNewView may be nil.
func newViewCache(onNewView func(ViewKey)) *viewCache {
	return &viewCache{views: map[ViewKey]*viewState{}, watchAt: map[int64]ViewKey{}, onNewView: onNewView, keyOf: viewKeyOf}
}

// marshalResources marshals each resource once, deterministically. A resource that is the
// very same value as in prev (the builder reuses unchanged services' resources) is not
// marshalled again.
func marshalResources(res Resources, prev map[types.Resource]*marshalled) (map[string]*typeResources, map[types.Resource]*marshalled, error) {
	out := make(map[string]*typeResources, len(res))
	seen := make(map[types.Resource]*marshalled, len(prev))
	opts := proto.MarshalOptions{Deterministic: true}
	for typ, list := range res {
		tr := &typeResources{byName: make(map[string]*marshalled, len(list))}
		h := sha256.New()
		for _, r := range list {
			m := prev[r]
			if m == nil {
				b, err := opts.Marshal(r)
				if err != nil {
					return nil, nil, fmt.Errorf("primary: marshal %s: %w", cache.GetResourceName(r), err)
				}
				sum := sha256.Sum256(b)
				m = &marshalled{name: cache.GetResourceName(r), version: hex.EncodeToString(sum[:8]), any: &anypb.Any{TypeUrl: typ, Value: b}}
			}
			seen[r] = m
			tr.byName[m.name] = m
		}
		names := make([]string, 0, len(tr.byName))
		for n := range tr.byName {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			h.Write([]byte(n))
			h.Write([]byte(tr.byName[n].version))
		}
		tr.all = hex.EncodeToString(h.Sum(nil)[:8])
		out[typ] = tr
	}
	return out, seen, nil
}

// stateLocked returns key's view, creating an empty one (c.mu held).
func (c *viewCache) stateLocked(key ViewKey) *viewState {
	v := c.views[key]
	if v == nil {
		v = &viewState{sotw: map[int64]*sotwWatch{}, deltas: map[int64]*deltaWatch{}}
		c.views[key] = v
	}
	return v
}

// watchedStateLocked returns the view of a proxy's node, announcing views never asked for
// before.
func (c *viewCache) watchedStateLocked(key ViewKey) *viewState {
	if _, ok := c.views[key]; !ok && c.onNewView != nil {
		c.onNewView(key)
	}
	return c.stateLocked(key)
}

// viewKeyOf returns the view of a proxy's node; a node the primary cannot classify gets
// no watch (the stream callbacks refuse it too).
func viewKeyOf(n *core.Node) (ViewKey, error) {
	p, err := ProxyFromNode(n)
	if err != nil {
		return ViewKey{}, fmt.Errorf("primary: refusing xDS watch: %w", err)
	}
	return p.Key(), nil
}

// SetView replaces a view's resources and answers every watch whose resources changed.
func (c *viewCache) SetView(key ViewKey, res Resources) error {
	c.mu.Lock()
	var prev map[types.Resource]*marshalled
	if v := c.views[key]; v != nil {
		prev = v.byRes
	}
	c.mu.Unlock()
	// Marshal outside the lock; SetView is called by one pusher, so prev cannot change.
	typesByURL, byRes, err := marshalResources(res, prev)
	if err != nil {
		return err
	}
	type send struct {
		sotw  chan cache.Response
		sresp cache.Response
		delta chan cache.DeltaResponse
		dresp cache.DeltaResponse
	}
	var sends []send
	c.mu.Lock()
	v := c.stateLocked(key)
	v.types, v.byRes = typesByURL, byRes
	ids := make([]int64, 0, len(v.sotw)+len(v.deltas))
	for id := range v.sotw {
		ids = append(ids, id)
	}
	for id := range v.deltas {
		ids = append(ids, id)
	}
	typeOf := func(id int64) string {
		if w, ok := v.sotw[id]; ok {
			return w.req.GetTypeUrl()
		}
		return v.deltas[id].req.GetTypeUrl()
	}
	rank := func(t string) int {
		if i := slices.Index(pushOrder, t); i >= 0 {
			return i
		}
		return len(pushOrder)
	}
	sort.Slice(ids, func(i, j int) bool {
		ri, rj := rank(typeOf(ids[i])), rank(typeOf(ids[j]))
		if ri != rj {
			return ri < rj
		}
		return ids[i] < ids[j]
	})
	for _, id := range ids {
		if w, ok := v.sotw[id]; ok {
			if resp := sotwResponse(v, w.req, w.sub); resp != nil {
				delete(v.sotw, id)
				delete(c.watchAt, id)
				sends = append(sends, send{sotw: w.ch, sresp: resp})
			}
			continue
		}
		w := v.deltas[id]
		if resp := deltaResponse(v, w.req, w.sub); resp != nil {
			delete(v.deltas, id)
			delete(c.watchAt, id)
			sends = append(sends, send{delta: w.ch, dresp: resp})
		}
	}
	c.mu.Unlock()
	// Send outside the lock: a stream's loop may be waiting for the lock in CreateWatch
	// while its channel is full. Each watch was removed above, so it gets one response.
	for _, s := range sends {
		if s.sotw != nil {
			s.sotw <- s.sresp
		} else {
			s.delta <- s.dresp
		}
	}
	return nil
}

// wildcardTypes are the types a state-of-the-world client may request without names.
func wildcard(typ string, sub cache.Subscription) bool {
	return sub.IsWildcard() && (typ == resource.ListenerType || typ == resource.ClusterType)
}

// selected returns the resources of typ a subscription covers, sorted by name.
func selected(v *viewState, typ string, sub cache.Subscription) []*marshalled {
	tr := v.types[typ]
	if tr == nil {
		return nil
	}
	var out []*marshalled
	if wildcard(typ, sub) {
		out = make([]*marshalled, 0, len(tr.byName))
		for _, m := range tr.byName {
			out = append(out, m)
		}
	} else {
		for name := range sub.SubscribedResources() {
			if m, ok := tr.byName[name]; ok {
				out = append(out, m)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// sotwResponse returns the response a state-of-the-world watch should get now, or nil when
// what it would get is what it already has.
func sotwResponse(v *viewState, req *discovery.DiscoveryRequest, sub cache.Subscription) cache.Response {
	if v.types == nil {
		return nil // the view has not been built yet
	}
	typ := req.GetTypeUrl()
	res := selected(v, typ, sub)
	var version string
	if tr := v.types[typ]; tr != nil && wildcard(typ, sub) {
		version = tr.all
	} else {
		h := sha256.New()
		for _, m := range res {
			h.Write([]byte(m.name))
			h.Write([]byte(m.version))
		}
		version = hex.EncodeToString(h.Sum(nil)[:8])
	}
	if version == req.GetVersionInfo() {
		return nil
	}
	out := &discovery.DiscoveryResponse{VersionInfo: version, TypeUrl: typ, Resources: make([]*anypb.Any, len(res))}
	returned := make(map[string]string, len(res))
	for i, m := range res {
		out.Resources[i] = m.any // shared bytes: marshalled once for every proxy
		returned[m.name] = version
	}
	return &sotwResp{req: req, resp: out, returned: returned}
}

// deltaResponse returns the incremental update a delta watch should get now, or nil when
// nothing it subscribes to changed.
func deltaResponse(v *viewState, req *discovery.DeltaDiscoveryRequest, sub cache.Subscription) cache.DeltaResponse {
	if v.types == nil {
		return nil
	}
	typ := req.GetTypeUrl()
	known := sub.ReturnedResources()
	next := make(map[string]string, len(known))
	for k, ver := range known {
		next[k] = ver
	}
	out := &discovery.DeltaDiscoveryResponse{TypeUrl: typ}
	wild := sub.IsWildcard()
	for _, m := range selected(v, typ, sub) {
		if known[m.name] != m.version {
			out.Resources = append(out.Resources, &discovery.Resource{Name: m.name, Version: m.version, Resource: m.any})
			next[m.name] = m.version
		}
	}
	tr := v.types[typ]
	for name := range known {
		_, subscribed := sub.SubscribedResources()[name]
		present := tr != nil && tr.byName[name] != nil
		if !present && (wild || subscribed) {
			out.RemovedResources = append(out.RemovedResources, name)
			delete(next, name)
		}
	}
	sort.Strings(out.RemovedResources)
	// The first response on a stream is sent even when empty, so the client knows the
	// server has answered.
	first := len(known) == 0 && req.GetResponseNonce() == ""
	if len(out.Resources) == 0 && len(out.RemovedResources) == 0 && !first {
		return nil
	}
	if tr != nil {
		out.SystemVersionInfo = tr.all
	}
	return &deltaResp{req: req, resp: out, next: next}
}

// CreateWatch implements cache.ConfigWatcher for state-of-the-world streams.
func (c *viewCache) CreateWatch(req *cache.Request, sub cache.Subscription, ch chan cache.Response) (func(), error) {
	return openWatch(c, req.GetNode(), func(v *viewState) map[int64]*sotwWatch { return v.sotw },
		&sotwWatch{req: req, sub: sub, ch: ch},
		func(v *viewState) bool {
			if resp := sotwResponse(v, req, sub); resp != nil {
				ch <- resp
				return true
			}
			return false
		})
}

// CreateDeltaWatch implements cache.ConfigWatcher for incremental streams.
func (c *viewCache) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, ch chan cache.DeltaResponse) (func(), error) {
	return openWatch(c, req.GetNode(), func(v *viewState) map[int64]*deltaWatch { return v.deltas },
		&deltaWatch{req: req, sub: sub, ch: ch},
		func(v *viewState) bool {
			if resp := deltaResponse(v, req, sub); resp != nil {
				ch <- resp
				return true
			}
			return false
		})
}

// openWatch answers a watch at once when answerNow can (the stream's channel has room for
// one response per type and the stream's own loop is the caller, so this never blocks),
// and otherwise parks w in the view's watches until SetView answers it.
func openWatch[W any](c *viewCache, node *core.Node, watches func(*viewState) map[int64]W, w W, answerNow func(*viewState) bool) (func(), error) {
	key, err := c.keyOf(node)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.watchedStateLocked(key)
	if answerNow(v) {
		return func() {}, nil
	}
	c.nextID++
	id := c.nextID
	watches(v)[id] = w
	c.watchAt[id] = key
	return func() {
		c.mu.Lock()
		if at, ok := c.watchAt[id]; ok && c.views[at] != nil { // wherever rekey moved it
			delete(c.views[at].sotw, id)
			delete(c.views[at].deltas, id)
		}
		delete(c.watchAt, id)
		c.mu.Unlock()
	}, nil
}

// rekey moves every parked watch whose node now has another view key (its pod was
// relabelled, a Sidecar with workloadSelector was created, changed or deleted) to that
// view, announcing views never asked for before; the next SetView of the new view answers
// it. Only the watches of views affected says may move are looked at (the others' keys
// cannot have changed); keys only change through keyOf's inputs, so without Sidecars
// with workloadSelector nothing moves.
func (c *viewCache) rekey(affected func(ViewKey) bool) (moved int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, at := range c.watchAt {
		v := c.views[at]
		if v == nil || !affected(at) {
			continue
		}
		var node *core.Node
		sw, isSotw := v.sotw[id]
		dw, isDelta := v.deltas[id]
		switch {
		case isSotw:
			node = sw.req.GetNode()
		case isDelta:
			node = dw.req.GetNode()
		default:
			continue
		}
		key, err := c.keyOf(node)
		if err != nil || key == at {
			continue
		}
		nv := c.watchedStateLocked(key)
		if isSotw {
			delete(v.sotw, id)
			nv.sotw[id] = sw
		} else {
			delete(v.deltas, id)
			nv.deltas[id] = dw
		}
		c.watchAt[id] = key
		moved++
	}
	return moved
}

// Fetch implements cache.ConfigFetcher; REST polling is not offered.
func (c *viewCache) Fetch(context.Context, *cache.Request) (cache.Response, error) {
	return nil, errors.New("primary: xDS fetch (REST polling) is not supported; use ADS")
}

// Views returns the keys of the views that proxies have asked for.
func (c *viewCache) Views() []ViewKey {
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]ViewKey, 0, len(c.views))
	for k := range c.views {
		keys = append(keys, k)
	}
	return keys
}

// Dump returns a view's resources (type URL → marshalled resources) for config_dump.
func (c *viewCache) Dump(key ViewKey) (map[string][]*anypb.Any, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := c.views[key]
	if v == nil || v.types == nil {
		return nil, false
	}
	out := map[string][]*anypb.Any{}
	for typ, tr := range v.types {
		for _, m := range tr.byName {
			out[typ] = append(out[typ], m.any)
		}
		sort.Slice(out[typ], func(i, j int) bool { return string(out[typ][i].Value) < string(out[typ][j].Value) })
	}
	return out, true
}

// sotwResp is a state-of-the-world response around shared marshalled resources;
// returned maps each resource name to its version, for the server's ACK bookkeeping.
type sotwResp struct {
	req      *discovery.DiscoveryRequest
	resp     *discovery.DiscoveryResponse
	returned map[string]string
}

// GetDiscoveryResponse returns a fresh envelope each time (the server writes the nonce into
// it) around the shared resources.
func (r *sotwResp) GetDiscoveryResponse() (*discovery.DiscoveryResponse, error) {
	return &discovery.DiscoveryResponse{VersionInfo: r.resp.VersionInfo, TypeUrl: r.resp.TypeUrl, Resources: r.resp.Resources}, nil
}
func (r *sotwResp) GetRequest() *discovery.DiscoveryRequest { return r.req }
func (r *sotwResp) GetVersion() (string, error)             { return r.resp.VersionInfo, nil }
func (r *sotwResp) GetResponseVersion() string              { return r.resp.VersionInfo }
func (r *sotwResp) GetReturnedResources() map[string]string { return r.returned }
func (r *sotwResp) GetContext() context.Context             { return context.Background() }

// deltaResp is an incremental response; next is the client's resource versions after it.
type deltaResp struct {
	req  *discovery.DeltaDiscoveryRequest
	resp *discovery.DeltaDiscoveryResponse
	next map[string]string
}

// GetDeltaDiscoveryResponse returns a fresh envelope, like sotwResp's.
func (r *deltaResp) GetDeltaDiscoveryResponse() (*discovery.DeltaDiscoveryResponse, error) {
	return &discovery.DeltaDiscoveryResponse{
		SystemVersionInfo: r.resp.SystemVersionInfo, TypeUrl: r.resp.TypeUrl,
		Resources: r.resp.Resources, RemovedResources: r.resp.RemovedResources,
	}, nil
}
func (r *deltaResp) GetDeltaRequest() *discovery.DeltaDiscoveryRequest { return r.req }
func (r *deltaResp) GetSystemVersion() (string, error)                 { return r.resp.SystemVersionInfo, nil }
func (r *deltaResp) GetResponseVersion() string                        { return r.resp.SystemVersionInfo }
func (r *deltaResp) GetNextVersionMap() map[string]string              { return r.next }
func (r *deltaResp) GetReturnedResources() map[string]string           { return r.next }
func (r *deltaResp) GetContext() context.Context                       { return context.Background() }

var (
	_ cache.Cache         = (*viewCache)(nil)
	_ cache.Response      = (*sotwResp)(nil)
	_ cache.DeltaResponse = (*deltaResp)(nil)
)
