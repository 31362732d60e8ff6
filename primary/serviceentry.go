package primary

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	apinet "istio.io/api/networking/v1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// SourceServiceEntry is the source name of the shard the config cluster's ServiceEntries
// fill: one more registry source beside the cluster watchers, merged by hostname like
// the others.
const SourceServiceEntry = "serviceentry"

// KindServiceEntry is the ServiceEntry kind in ConfigStatus and the rejection metric.
const KindServiceEntry = "ServiceEntry"

// entryLookup returns what the primary's resolver last found for a DNS name: its
// addresses (sorted, possibly empty), the error of the last lookup when it found none,
// and whether the name has been looked up at all yet. Nil knows no name.
type entryLookup func(name string) (addrs []netip.Addr, err error, done bool)

// entryPlans is what the config cluster's ServiceEntries become: the registry shard
// (services, and the endpoints of STATIC and DNS entries), every entry's status, the
// DNS names the resolver must keep looking up, and the workload selectors whose pods the
// cluster watchers add as endpoints.
type entryPlans struct {
	shard     *ShardData
	status    []ConfigStatus
	names     []string // sorted, without duplicates
	selectors []entrySelector
	// exports is the exportTo of each applied host whose entry is not exported to every
	// namespace.
	exports map[mesh.Hostname]entryExport
}

// serviceEntryShard is planServiceEntries without a resolver (tests of static entries).
func serviceEntryShard(cluster mesh.ClusterID, domain string, ses []*networkingv1.ServiceEntry) (*ShardData, []ConfigStatus) {
	p := planServiceEntries(cluster, domain, ses, nil)
	return p.shard, p.status
}

// planServiceEntries validates ServiceEntries (in precedence order) and translates the
// applied ones into the content of the config cluster's ServiceEntry shard. It is pure
// (lookup is a snapshot of the resolver's results). Each entry is applied whole or
// refused whole with a reason, like the other Istio objects; a later entry naming a
// host an earlier one has is refused (conflict).
//
// What is supported: resolution STATIC, with static endpoints (IP addresses, per-port
// numbers, labels that subsets select on, network, locality, weight) or a
// workloadSelector (pods of the entry's namespace in every cluster, added by the cluster
// watchers); resolution DNS and DNS_ROUND_ROBIN, whose endpoint names (or, without
// endpoints, hosts) the primary resolves; location MESH_EXTERNAL (plain connections) or
// MESH_INTERNAL (mTLS to endpoints labelled security.istio.io/tlsMode=istio, as for
// pods); addresses as the service's VIP.
func planServiceEntries(cluster mesh.ClusterID, domain string, ses []*networkingv1.ServiceEntry, lookup entryLookup) entryPlans {
	data := &ShardData{Services: map[mesh.Hostname]*Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
	out := entryPlans{shard: data}
	owner := map[mesh.Hostname]string{}
	for _, se := range ses {
		st := ConfigStatus{Kind: KindServiceEntry, Namespace: se.Namespace, Name: se.Name, ResourceVersion: se.ResourceVersion, UID: string(se.UID)}
		ep, err := planServiceEntry(cluster, domain, se, lookup)
		if err == nil {
			for _, s := range ep.svcs {
				if o := owner[s.Hostname]; o != "" {
					err = rejectConfig(ReasonConflict, "host %s already has ServiceEntry %s", s.Hostname, o)
					break
				}
			}
		}
		if err != nil {
			st.Reason, st.Message = err.reason, err.msg
			out.status = append(out.status, st)
			continue
		}
		for _, s := range ep.svcs {
			owner[s.Hostname] = se.Namespace + "/" + se.Name
			data.Services[s.Hostname] = s
			if len(ep.eps) > 0 {
				data.Endpoints[s.Hostname] = ep.eps
			}
			st.Hosts = append(st.Hosts, string(s.Hostname))
			if !ep.export.all {
				if out.exports == nil {
					out.exports = map[mesh.Hostname]entryExport{}
				}
				out.exports[s.Hostname] = entryExport{id: objectID(KindServiceEntry, se.Namespace, se.Name), set: ep.export}
			}
		}
		out.names = append(out.names, ep.names...)
		if ep.sel != nil {
			out.selectors = append(out.selectors, *ep.sel)
		}
		st.Applied, st.Warnings = true, ep.warn
		out.status = append(out.status, st)
	}
	slices.Sort(out.names)
	out.names = slices.Compact(out.names)
	return out
}

// entryPlan is one valid ServiceEntry: a Service per host (all with the same ports),
// their shared endpoints, warnings, the DNS names it needs and its workload selector.
type entryPlan struct {
	svcs  []*Service
	eps   []mesh.Endpoint
	warn  []string
	names []string
	sel   *entrySelector
	// export is the entry's exportTo.
	export exportSet
}

// planServiceEntry validates one ServiceEntry.
func planServiceEntry(cluster mesh.ClusterID, domain string, se *networkingv1.ServiceEntry, lookup entryLookup) (*entryPlan, *configError) {
	spec := &se.Spec
	var warn []string
	export, eerr := parseExportTo(se.Namespace, spec.GetExportTo(), true)
	if eerr != nil {
		return nil, eerr
	}
	res := spec.GetResolution()
	switch res {
	case apinet.ServiceEntry_STATIC, apinet.ServiceEntry_DNS, apinet.ServiceEntry_DNS_ROUND_ROBIN:
	case apinet.ServiceEntry_NONE:
		return nil, rejectConfig(ReasonUnsupported, "resolution NONE (pass through to the address the caller dialled) is not supported: proxyless gRPC clients dial names, not addresses; use STATIC with endpoints, or DNS")
	default:
		return nil, rejectConfig(ReasonUnsupported, "resolution %s is not supported (STATIC, DNS and DNS_ROUND_ROBIN are)", res)
	}
	dns := res != apinet.ServiceEntry_STATIC
	if res == apinet.ServiceEntry_DNS_ROUND_ROBIN {
		warn = append(warn, "resolution DNS_ROUND_ROBIN is resolved like DNS: every address is an endpoint (Envoy's logical DNS would connect to one at a time)")
	}
	if len(spec.GetHosts()) == 0 {
		return nil, rejectConfig(ReasonInvalid, "hosts: at least one host is required")
	}
	if len(spec.GetPorts()) == 0 {
		return nil, rejectConfig(ReasonInvalid, "ports: at least one port is required")
	}
	clusterDomain := ".svc." + cmp.Or(domain, mesh.DefaultDomain)
	var hosts []mesh.Hostname
	for i, h := range spec.GetHosts() {
		if strings.Contains(h, "*") {
			return nil, rejectConfig(ReasonUnsupported, "hosts[%d] %q: wildcard hosts are not supported yet", i, h)
		}
		hn, err := mesh.ParseHostname(strings.ToLower(h))
		if err != nil || !strings.Contains(h, ".") {
			return nil, rejectConfig(ReasonInvalid, "hosts[%d] %q: not a fully qualified DNS name", i, h)
		}
		if strings.HasSuffix(string(hn), clusterDomain) {
			return nil, rejectConfig(ReasonConflict, "hosts[%d] %s: names a Kubernetes service (under %s); ServiceEntries add hosts the clusters do not define", i, hn, clusterDomain[1:])
		}
		if !slices.Contains(hosts, hn) {
			hosts = append(hosts, hn)
		}
	}
	var vip netip.Addr
	for i, a := range spec.GetAddresses() {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			addr, aerr := netip.ParseAddr(a)
			if aerr != nil {
				return nil, rejectConfig(ReasonInvalid, "addresses[%d] %q: not an IP address or CIDR", i, a)
			}
			p = netip.PrefixFrom(addr, addr.BitLen())
		}
		if p.IsSingleIP() && !vip.IsValid() {
			vip = p.Addr()
		} else if !p.IsSingleIP() {
			warn = append(warn, fmt.Sprintf("addresses[%d] %s: address ranges are not used yet", i, a))
		}
	}
	var ports []ServicePort
	targets := map[string]uint16{}
	for i, p := range spec.GetPorts() {
		pf := fmt.Sprintf("ports[%d]", i)
		if p.GetNumber() == 0 || p.GetNumber() > 65535 {
			return nil, rejectConfig(ReasonInvalid, "%s.number %d: not a port number", pf, p.GetNumber())
		}
		if p.GetTargetPort() > 65535 {
			return nil, rejectConfig(ReasonInvalid, "%s.targetPort %d: not a port number", pf, p.GetTargetPort())
		}
		name := p.GetName()
		if name == "" {
			return nil, rejectConfig(ReasonInvalid, "%s.name: required", pf)
		}
		if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
			return nil, rejectConfig(ReasonInvalid, "%s.name %q: %s", pf, name, strings.Join(errs, "; "))
		}
		if slices.ContainsFunc(ports, func(q ServicePort) bool { return q.Name == name || uint32(q.Port) == p.GetNumber() }) {
			return nil, rejectConfig(ReasonInvalid, "%s: duplicate name %q or number %d", pf, name, p.GetNumber())
		}
		ports = append(ports, ServicePort{Name: name, Port: uint16(p.GetNumber()), Protocol: entryProtocol(p.GetProtocol())})
		targets[name] = uint16(cmp.Or(p.GetTargetPort(), p.GetNumber()))
	}
	internal := spec.GetLocation() == apinet.ServiceEntry_MESH_INTERNAL
	plan := &entryPlan{export: export}
	if ws := spec.GetWorkloadSelector(); ws != nil {
		sel, err := planEntrySelector(se, ws.GetLabels(), dns, internal, ports, targets)
		if err != nil {
			return nil, err
		}
		plan.sel = sel
	}
	endpoints := spec.GetEndpoints()
	if dns && len(endpoints) == 0 {
		// Without endpoints, a DNS entry's hosts are what is resolved (Istio's rule).
		for _, h := range hosts {
			endpoints = append(endpoints, &apinet.WorkloadEntry{Address: string(h)})
		}
	}
	var eps []mesh.Endpoint
	for i, we := range endpoints {
		ef := fmt.Sprintf("endpoints[%d]", i)
		ep := mesh.Endpoint{Cluster: cluster, Weight: we.GetWeight(), Health: mesh.HealthHealthy, Labels: we.GetLabels()}
		var err error
		if we.GetNetwork() != "" {
			if ep.Network, err = mesh.ParseNetworkID(we.GetNetwork()); err != nil {
				return nil, rejectConfig(ReasonInvalid, "%s.network: %v", ef, err)
			}
		}
		if ep.Locality, err = mesh.ParseLocality(we.GetLocality()); err != nil {
			return nil, rejectConfig(ReasonInvalid, "%s.locality: %v", ef, err)
		}
		for name, n := range we.GetPorts() {
			if _, ok := targets[name]; !ok {
				return nil, rejectConfig(ReasonInvalid, "%s.ports[%s]: the entry has no port of that name", ef, name)
			}
			if n == 0 || n > 65535 {
				return nil, rejectConfig(ReasonInvalid, "%s.ports[%s] %d: not a port number", ef, name, n)
			}
		}
		for _, p := range ports {
			n := targets[p.Name]
			if v, ok := we.GetPorts()[p.Name]; ok {
				n = uint16(v)
			}
			ep.Ports = append(ep.Ports, mesh.Port{Name: p.Name, Number: n, Protocol: p.Protocol})
		}
		ep.MTLSReady = internal && we.GetLabels()[LabelTLSMode] == TLSModeIstio
		if we.GetServiceAccount() != "" {
			warn = append(warn, ef+".serviceAccount is not checked yet")
		}
		addrs, w, cerr := entryAddresses(ef, we.GetAddress(), res, lookup)
		if cerr != nil {
			return nil, cerr
		}
		if w != "" {
			warn = append(warn, w)
		}
		if !dns {
			if slices.ContainsFunc(eps, func(o mesh.Endpoint) bool { return o.Address == addrs[0] }) {
				return nil, rejectConfig(ReasonInvalid, "%s.address %s: duplicate endpoint", ef, addrs[0])
			}
		} else if _, err := netip.ParseAddr(we.GetAddress()); err != nil {
			plan.names = append(plan.names, we.GetAddress())
		}
		for _, a := range addrs {
			if slices.ContainsFunc(eps, func(o mesh.Endpoint) bool { return o.Address == a }) {
				continue // two names resolving to one address: one endpoint (the first)
			}
			e := ep
			e.Address = a
			eps = append(eps, e)
		}
	}
	if !internal && slices.ContainsFunc(eps, func(e mesh.Endpoint) bool { return e.Labels[LabelTLSMode] == TLSModeIstio }) {
		warn = append(warn, "endpoints labelled "+LabelTLSMode+"="+TLSModeIstio+" get no mTLS in a MESH_EXTERNAL entry")
	}
	slices.SortFunc(eps, func(a, b mesh.Endpoint) int { return a.Address.Compare(b.Address) })
	key := mesh.ServiceKey{Namespace: se.Namespace, Name: se.Name}
	for _, h := range hosts {
		plan.svcs = append(plan.svcs, &Service{Hostname: h, Key: key, VIP: vip, Ports: ports})
	}
	if plan.sel != nil {
		plan.sel.Hosts = hosts
	}
	slices.Sort(warn)
	plan.eps, plan.warn = eps, slices.Compact(warn)
	return plan, nil
}

// entryAddresses returns the addresses of one endpoint address as written: an IP under
// every resolution; under DNS and DNS_ROUND_ROBIN a hostname's addresses as the
// resolver last found them, with a warning while it has found none.
func entryAddresses(ef, raw string, res apinet.ServiceEntry_Resolution, lookup entryLookup) ([]netip.Addr, string, *configError) {
	if addr, err := netip.ParseAddr(raw); err == nil {
		return []netip.Addr{addr.Unmap()}, "", nil
	}
	if res == apinet.ServiceEntry_STATIC {
		return nil, "", rejectConfig(ReasonInvalid, "%s.address %q: resolution STATIC needs an IP address", ef, raw)
	}
	if _, err := mesh.ParseHostname(strings.ToLower(raw)); err != nil || !strings.Contains(raw, ".") {
		return nil, "", rejectConfig(ReasonInvalid, "%s.address %q: resolution %s needs an IP address or a fully qualified DNS name", ef, raw, res)
	}
	if lookup == nil {
		return nil, fmt.Sprintf("%s.address %s: not resolved yet", ef, raw), nil
	}
	addrs, err, done := lookup(raw)
	switch {
	case !done:
		return nil, fmt.Sprintf("%s.address %s: not resolved yet", ef, raw), nil
	case len(addrs) == 0 && err != nil:
		return nil, fmt.Sprintf("%s.address %s: %v (no endpoints until it resolves)", ef, raw, err), nil
	case len(addrs) == 0:
		return nil, fmt.Sprintf("%s.address %s: resolves to no address", ef, raw), nil
	}
	return addrs, "", nil
}

// entryProtocol maps a ServiceEntry port protocol to the mesh's: HTTPS and TLS are TLS,
// the HTTP family as named, everything else (TCP, MONGO, REDIS, MYSQL, unset) plain TCP.
func entryProtocol(p string) mesh.Protocol {
	switch strings.ToUpper(p) {
	case "HTTP", "GRPC-WEB":
		return mesh.ProtocolHTTP
	case "HTTP2":
		return mesh.ProtocolHTTP2
	case "GRPC":
		return mesh.ProtocolGRPC
	case "HTTPS", "TLS":
		return mesh.ProtocolTLS
	default:
		return mesh.ProtocolTCP
	}
}
