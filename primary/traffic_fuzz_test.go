package primary

import (
	"net/netip"
	"testing"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// FuzzTrafficPlan feeds arbitrary VirtualService and DestinationRule documents (YAML or
// JSON, as users write them) to the planner and builder over the bookinfo mesh. Whatever
// the input, planning never panics, every object is either applied or refused with a
// reason, and the resources of every proxy kind pass Envoy's proto validation (so a bad
// object can never make the primary send a NACKed configuration).
func FuzzTrafficPlan(f *testing.F) {
	f.Add(bookinfoVS, bookinfoDR)
	f.Add("spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}, weight: 100}]}]}", "spec: {host: reviews, subsets: [{name: v1}]}")
	f.Add(`{"spec":{"hosts":["ratings"],"http":[{"match":[{"uri":{"regex":"(a"}}],"route":[{"destination":{"host":"ratings"}}]}]}}`, `{"spec":{"host":"x"}}`)
	f.Add("spec: {hosts: [reviews], http: [{match: [{headers: {':path': {exact: x}}}], route: [{destination: {host: reviews}, weight: -1}]}]}", "spec: {host: reviews, subsets: [{name: V_1}]}")
	f.Add("spec: {hosts: [reviews], http: [{fault: {delay: {fixedDelay: 1s, percent: 30}, abort: {grpcStatus: unavailable, percentage: {value: 0.1}}}, timeout: 0s, retries: {attempts: 2, retryOn: '5xx,503,unavailable', perTryTimeout: 1s, backoff: 10ms}, route: [{destination: {host: reviews}}]}]}", "spec: {host: reviews}")
	f.Add("spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}", policyDR)
	f.Add("spec: {hosts: [ratings], http: [{route: [{destination: {host: ratings, port: {number: 9090}}}]}]}", policyRatingsDR)
	f.Add("spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}", "spec: {host: reviews, trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: c, ttl: 0s}, maglev: {tableSize: 65537}}, localityLbSetting: {failover: [{from: r, to: s}], failoverPriority: [topology.istio.io/network]}}, outlierDetection: {consecutive5xxErrors: 0, minHealthPercent: -5}, connectionPool: {tcp: {maxConnections: 0}, http: {maxRetries: 3}}}}")
	f.Add("spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}", "spec: {host: reviews, trafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: 'r/*', to: {'r/c1': 70, 'r/*': 30}}, {from: '*', to: {s: 100}}]}}}}")
	f.Add("spec: {exportTo: [other], hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: v1}}]}]}", "spec: {exportTo: ['.'], host: reviews, subsets: [{name: v1}]}")
	f.Add("spec: {exportTo: ['*', x], hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}", "spec: {exportTo: ['~'], host: reviews}")
	reg := bookinfoRegistry()
	f.Fuzz(func(t *testing.T, vsDoc, drDoc string) {
		vs := &networkingv1.VirtualService{}
		dr := &networkingv1.DestinationRule{}
		if yaml.Unmarshal([]byte(vsDoc), vs) != nil || yaml.Unmarshal([]byte(drDoc), dr) != nil {
			return // the API server would refuse it before the primary sees it
		}
		vs.Namespace, vs.Name, dr.Namespace, dr.Name = "bookinfo", "vs", "bookinfo", "dr"
		reg.SetTrafficConfig(newTrafficConfig("cluster.local", []*networkingv1.VirtualService{vs}, []*networkingv1.DestinationRule{dr}))
		v := reg.View()
		plan := planTraffic(v)
		if len(plan.status) != 2 {
			t.Fatalf("%d statuses for 2 objects", len(plan.status))
		}
		for _, st := range plan.status {
			if !st.Applied && (st.Reason == "" || st.Message == "") {
				t.Fatalf("refused without a reason: %+v", st)
			}
		}
		here := mesh.Locality{Region: "r", Zone: "c1"}
		for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1", Locality: here}, {Kind: ProxyGRPC, Network: "n1", Locality: here}, {Kind: ProxyGateway, Network: "n2"},
			{Kind: ProxyGRPC, Network: "n1", Namespace: "bookinfo"}, {Kind: ProxySidecar, Network: "n1", Namespace: "other"}} {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatalf("%s: %v", key, err)
			}
			if err := res.Validate(); err != nil {
				t.Fatalf("%s: invalid resources from vs=%q dr=%q: %v", key, vsDoc, drDoc, err)
			}
		}
	})
}

// FuzzServiceEntryPlan feeds arbitrary ServiceEntry documents to the entry planner (with
// every DNS name resolving to one address) and builds the result: planning never panics,
// each entry is applied or refused with a reason, and every proxy kind's resources pass
// Envoy's validation.
func FuzzServiceEntryPlan(f *testing.F) {
	f.Add(externalSE)
	f.Add(internalSE)
	f.Add(dnsEntry)
	f.Add(dnsHostsEntry)
	f.Add(selectorEntry)
	f.Add("spec: {hosts: [a.b.c], resolution: DNS, ports: [{number: 1, name: x}], endpoints: [{address: '::1'}, {address: a.b.c, ports: {x: 0}}]}")
	lookup := func(name string) ([]netip.Addr, error, bool) {
		return []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}, nil, true
	}
	f.Fuzz(func(t *testing.T, doc string) {
		se := &networkingv1.ServiceEntry{}
		if yaml.Unmarshal([]byte(doc), se) != nil {
			return
		}
		se.Namespace, se.Name = "shop", "se"
		p := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{se}, lookup)
		if len(p.status) != 1 || (!p.status[0].Applied && (p.status[0].Reason == "" || p.status[0].Message == "")) {
			t.Fatalf("status %+v", p.status)
		}
		r := NewRegistry()
		r.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: "c1"}, p.shard)
		v := r.View()
		for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1"}, {Kind: ProxyGateway, Network: "n1"}} {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatalf("%s: %v", key, err)
			}
			if err := res.Validate(); err != nil {
				t.Fatalf("%s: invalid resources from %q: %v", key, doc, err)
			}
		}
	})
}
