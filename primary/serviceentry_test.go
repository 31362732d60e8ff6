package primary

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Two ServiceEntries as Istio's documentation describes them (written anew): an external
// API with two static addresses, and VMs inside the mesh (one speaking mTLS), with a
// DestinationRule subset selecting the VMs by label and a VirtualService splitting
// between the subsets.
const (
	externalSE = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop, resourceVersion: "3"}
spec:
  hosts: [api.payments.example.com]
  addresses: [240.0.0.10]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {number: 443, name: grpc-api, protocol: GRPC, targetPort: 8443}
  endpoints:
  - {address: 203.0.113.10}
  - {address: 203.0.113.11, ports: {grpc-api: 9443}, locality: eu/eu-1, weight: 3}
`
	internalSE = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop, resourceVersion: "4"}
spec:
  hosts: [ledger.vm.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 7070, name: grpc, protocol: GRPC}
  endpoints:
  - {address: 10.50.0.1, labels: {version: v1, security.istio.io/tlsMode: istio}, network: n1}
  - {address: 10.50.0.2, labels: {version: v2, security.istio.io/tlsMode: istio}, network: n1}
`
	ledgerDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ledger, namespace: shop, resourceVersion: "5"}
spec:
  host: ledger.vm.internal
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
`
	ledgerVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: shop, resourceVersion: "6"}
spec:
  hosts: [ledger.vm.internal]
  http:
  - route:
    - {destination: {host: ledger.vm.internal, subset: v1}, weight: 80}
    - {destination: {host: ledger.vm.internal, subset: v2}, weight: 20}
`
)

func mustSE(t testing.TB, y string) *networkingv1.ServiceEntry {
	t.Helper()
	se := &networkingv1.ServiceEntry{}
	if err := yaml.Unmarshal([]byte(y), se); err != nil {
		t.Fatal(err)
	}
	return se
}

// entryView is the bookinfo registry plus the ServiceEntries' shard and the traffic
// configuration, as the config watcher stores them.
func entryView(t testing.TB, ses []string, vss, drs []string) (*View, []ConfigStatus) {
	r := bookinfoRegistry()
	var list []*networkingv1.ServiceEntry
	for _, y := range ses {
		list = append(list, mustSE(t, y))
	}
	shard, st := serviceEntryShard("c1", "cluster.local", list)
	r.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: "c1"}, shard)
	var vs []*networkingv1.VirtualService
	var dr []*networkingv1.DestinationRule
	for _, y := range vss {
		vs = append(vs, mustVS(t, y))
	}
	for _, y := range drs {
		dr = append(dr, mustDR(t, y))
	}
	tc := newTrafficConfig("cluster.local", vs, dr)
	tc.ServiceEntries = st
	r.SetTrafficConfig(tc)
	return r.View(), st
}

// TestServiceEntryGolden pins the xDS of both entries and the routing over them
// (testdata/serviceentry-<kind>.golden; rewrite with -update).
func TestServiceEntryGolden(t *testing.T) {
	v, _ := entryView(t, []string{externalSE, internalSE}, []string{ledgerVS}, []string{ledgerDR})
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Fatalf("refused: %+v", st)
		}
	}
	for _, key := range []ViewKey{{Kind: ProxyGRPC, Network: "n1"}, {Kind: ProxySidecar, Network: "n1"}} {
		t.Run(string(key.Kind), func(t *testing.T) {
			res, err := BuildResources(v, key)
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
			// Only the entries' resources: the bookinfo part is pinned elsewhere.
			for typ, list := range res {
				out := list[:0:0]
				for _, r := range list {
					if n := cache.GetResourceName(r); strings.Contains(n, "example.com") || strings.Contains(n, "vm.internal") || typ == resource.RouteType {
						out = append(out, r)
					}
				}
				res[typ] = out
			}
			got, err := renderGolden(key, res)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "serviceentry-"+string(key.Kind)+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)); d != "" {
				t.Errorf("output for %s differs from %s (-want +got):\n%s", key, path, d)
			}
		})
	}
}

// TestServiceEntryEndpoints checks what the golden files show in bulk: external
// endpoints with their per-endpoint ports and no mTLS, internal ones with mTLS and subset
// selection by label, and the VIP.
func TestServiceEntryEndpoints(t *testing.T) {
	v, _ := entryView(t, []string{externalSE, internalSE}, []string{ledgerVS}, []string{ledgerDR})
	pay := v.Service("api.payments.example.com")
	if pay == nil || pay.VIPs["c1"].String() != "240.0.0.10" || pay.Key != (mesh.ServiceKey{Namespace: "shop", Name: "payments"}) {
		t.Fatalf("payments service: %+v", pay)
	}
	res, err := BuildResources(v, ViewKey{Kind: ProxyGRPC, Network: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	addrs := map[string][]string{}
	for _, r := range res[resource.EndpointType] {
		cla := r.(*endpoint.ClusterLoadAssignment)
		for _, l := range cla.Endpoints {
			for _, e := range l.LbEndpoints {
				sa := e.GetEndpoint().GetAddress().GetSocketAddress()
				addrs[cla.ClusterName] = append(addrs[cla.ClusterName], sa.GetAddress()+":"+strconv.Itoa(int(sa.GetPortValue())))
			}
		}
	}
	want := map[string][]string{
		"outbound|443||api.payments.example.com": {"203.0.113.10:8443", "203.0.113.11:9443"},
		"outbound|7070|v1|ledger.vm.internal":    {"10.50.0.1:7070"},
		"outbound|7070|v2|ledger.vm.internal":    {"10.50.0.2:7070"},
	}
	for name, w := range want {
		if d := cmp.Diff(w, addrs[name]); d != "" {
			t.Errorf("%s (-want +got):\n%s", name, d)
		}
	}
	tls := map[string]bool{}
	for _, r := range res[resource.ClusterType] {
		c := r.(*cluster.Cluster)
		tls[c.Name] = c.TransportSocket != nil
	}
	if tls["outbound|443||api.payments.example.com"] || !tls["outbound|7070|v1|ledger.vm.internal"] {
		t.Errorf("mTLS per cluster: %v (external must be plain, internal mTLS)", tls)
	}
}

// TestServiceEntryBadConfig checks each kind of bad ServiceEntry is refused whole with
// its reason while the good entry beside it stays applied.
func TestServiceEntryBadConfig(t *testing.T) {
	se := func(spec string) string {
		return "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: shop}\nspec:\n" + spec
	}
	const ports = "  ports: [{number: 80, name: http, protocol: HTTP}]\n"
	cases := []struct{ name, se, reason, msg string }{
		{"no hosts", se("  resolution: STATIC\n" + ports), ReasonInvalid, "hosts: at least one"},
		{"no ports", se("  hosts: [a.example.com]\n  resolution: STATIC\n"), ReasonInvalid, "ports: at least one"},
		{"wildcard host", se("  hosts: ['*.example.com']\n  resolution: STATIC\n" + ports), ReasonUnsupported, "wildcard"},
		{"short host", se("  hosts: [payments]\n  resolution: STATIC\n" + ports), ReasonInvalid, "not a fully qualified"},
		{"a Kubernetes service name", se("  hosts: [reviews.bookinfo.svc.cluster.local]\n  resolution: STATIC\n" + ports), ReasonConflict, "names a Kubernetes service"},
		{"resolution NONE", se("  hosts: [a.example.com]\n" + ports), ReasonUnsupported, "resolution NONE"},
		{"resolution DYNAMIC_DNS", se("  hosts: [a.example.com]\n  resolution: DYNAMIC_DNS\n" + ports), ReasonUnsupported, "resolution DYNAMIC_DNS"},
		{"DNS endpoint not a name", se("  hosts: [a.example.com]\n  resolution: DNS\n" + ports + "  endpoints: [{address: 'db_1'}]\n"), ReasonInvalid, "endpoints[0].address"},
		{"workloadSelector and endpoints", se("  hosts: [a.example.com]\n  resolution: STATIC\n  workloadSelector: {labels: {app: a}}\n" + ports + "  endpoints: [{address: 192.0.2.1}]\n"), ReasonInvalid, "mutually exclusive"},
		{"workloadSelector under DNS", se("  hosts: [a.example.com]\n  resolution: DNS\n  workloadSelector: {labels: {app: a}}\n" + ports), ReasonInvalid, "resolution STATIC"},
		{"workloadSelector without labels", se("  hosts: [a.example.com]\n  resolution: STATIC\n  workloadSelector: {}\n" + ports), ReasonInvalid, "at least one label"},
		{"workloadSelector bad label", se("  hosts: [a.example.com]\n  resolution: STATIC\n  workloadSelector: {labels: {'a b': x}}\n" + ports), ReasonInvalid, "workloadSelector.labels key"},
		{"bad address", se("  hosts: [a.example.com]\n  resolution: STATIC\n  addresses: [not-an-ip]\n" + ports), ReasonInvalid, "addresses[0]"},
		{"port without a name", se("  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, protocol: HTTP}]\n"), ReasonInvalid, "ports[0].name: required"},
		{"duplicate port", se("  hosts: [a.example.com]\n  resolution: STATIC\n  ports: [{number: 80, name: a}, {number: 80, name: b}]\n"), ReasonInvalid, "ports[1]: duplicate"},
		{"endpoint hostname under STATIC", se("  hosts: [a.example.com]\n  resolution: STATIC\n" + ports + "  endpoints: [{address: a.example.net}]\n"), ReasonInvalid, "endpoints[0].address"},
		{"endpoint port of no name", se("  hosts: [a.example.com]\n  resolution: STATIC\n" + ports + "  endpoints: [{address: 192.0.2.1, ports: {grpc: 90}}]\n"), ReasonInvalid, "endpoints[0].ports[grpc]"},
		{"bad locality", se("  hosts: [a.example.com]\n  resolution: STATIC\n" + ports + "  endpoints: [{address: 192.0.2.1, locality: a//b}]\n"), ReasonInvalid, "endpoints[0].locality"},
		{"bad network", se("  hosts: [a.example.com]\n  resolution: STATIC\n" + ports + "  endpoints: [{address: 192.0.2.1, network: 'a b'}]\n"), ReasonInvalid, "endpoints[0].network"},
		{"host of an earlier entry", se("  hosts: [api.payments.example.com]\n  resolution: STATIC\n" + ports), ReasonConflict, "already has ServiceEntry shop/payments"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v, st := entryView(t, []string{externalSE, tc.se}, nil, nil)
			if len(st) != 2 || !st[0].Applied {
				t.Fatalf("the good entry: %+v", st)
			}
			bad := st[1]
			if bad.Applied || bad.Reason != tc.reason || !strings.Contains(bad.Message, tc.msg) {
				t.Fatalf("status %+v; want refused with %s, message containing %q", bad, tc.reason, tc.msg)
			}
			if v.Service("a.example.com") != nil || v.Service("api.payments.example.com") == nil {
				t.Error("the refused entry changed the registry")
			}
			// The refusal reaches configz with the other objects.
			found := false
			for _, s := range planTraffic(v).status {
				found = found || (s.Kind == KindServiceEntry && s.Name == "bad" && !s.Applied)
			}
			if !found {
				t.Error("the refusal is not in the plan's status")
			}
		})
	}
}
