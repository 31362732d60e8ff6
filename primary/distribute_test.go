package primary

import (
	"testing"

	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"

	"github.com/isthmus-mesh/isthmus/mesh"
)

const distributeDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - {from: "r/c1/*", to: {"r/c1": 80, "r/*": 20}}
        - {from: "r/c2", to: {"r/c1": 100}}
`

// localityWeightsOf returns the reviews cluster's locality weights (by locality) and
// priorities for a proxy.
func localityWeightsOf(t *testing.T, v *View, key ViewKey) map[string][2]uint32 {
	t.Helper()
	res, err := BuildResources(v, key)
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	out := map[string][2]uint32{}
	for _, r := range res[resource.EndpointType] {
		cla := r.(*endpoint.ClusterLoadAssignment)
		if cla.ClusterName != "outbound|9080||reviews.bookinfo.svc.cluster.local" {
			continue
		}
		for _, g := range cla.Endpoints {
			l := g.GetLocality()
			out[mesh.Locality{Region: l.GetRegion(), Zone: l.GetZone(), Subzone: l.GetSubZone()}.String()] = [2]uint32{g.GetLoadBalancingWeight().GetValue(), g.GetPriority()}
		}
	}
	return out
}

// TestLocalityDistribute checks localityLbSetting.distribute in EDS: a proxy in r/c1
// gets 80 to its zone and 20 to the rest of the region (the more specific pattern
// claims r/c1), a proxy in r/c2 sends everything to r/c1 (its own zone gets nothing and
// is left out), a proxy no "from" matches and one without a locality keep the
// endpoints' own weights; every locality is at priority 0, with or without outlier
// detection.
func TestLocalityDistribute(t *testing.T) {
	v := bookinfoView(t, nil, []string{distributeDR})
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Fatalf("refused: %+v", st)
		}
	}
	cases := []struct {
		loc  mesh.Locality
		want map[string][2]uint32
	}{
		{mesh.Locality{Region: "r", Zone: "c1"}, map[string][2]uint32{"r/c1": {80, 0}, "r/c2": {20, 0}}},
		{mesh.Locality{Region: "r", Zone: "c2"}, map[string][2]uint32{"r/c1": {100, 0}}},
		{mesh.Locality{Region: "elsewhere"}, map[string][2]uint32{"r/c1": {2, 0}, "r/c2": {1, 0}}},
		{mesh.Locality{}, map[string][2]uint32{"r/c1": {2, 0}, "r/c2": {1, 0}}},
	}
	for _, kind := range []ProxyKind{ProxyGRPC, ProxySidecar} {
		for _, tc := range cases {
			got := localityWeightsOf(t, v, ViewKey{Kind: kind, Network: "n1", Locality: tc.loc})
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("%s in %q (-want +got):\n%s", kind, tc.loc, d)
			}
		}
	}
}

// TestLocalityWeightsSplit checks the split of one pattern's weight over the
// localities it matches, in proportion to their own weights, rounded up.
func TestLocalityWeightsSplit(t *testing.T) {
	v := bookinfoView(t, nil, []string{distributeDR})
	hp := planTraffic(v).hosts["reviews.bookinfo.svc.cluster.local"]
	lp := hp.base.policy(9080).locality
	got, ok := lp.localityWeights(ViewKey{Locality: mesh.Locality{Region: "r", Zone: "c1", Subzone: "s"}}, map[mesh.Locality]uint32{
		{Region: "r", Zone: "c1"}: 5, {Region: "r", Zone: "a"}: 1, {Region: "r", Zone: "b"}: 2, {Region: "q"}: 7,
	})
	want := map[mesh.Locality]uint32{{Region: "r", Zone: "c1"}: 80, {Region: "r", Zone: "a"}: 7, {Region: "r", Zone: "b"}: 14}
	if !ok || !cmp.Equal(want, got) {
		t.Errorf("weights %v (applied %v); want %v", got, ok, want)
	}
}
