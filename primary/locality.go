package primary

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"

	apinet "istio.io/api/networking/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// localityPolicy assigns EDS priorities by the proxy's own locality (and network), so
// that traffic stays as close to the caller as it can until outlier detection ejects
// what is close (both clients then move to the next priority) and comes back when it
// is healthy again.
type localityPolicy struct {
	failover         []*apinet.LocalityLoadBalancerSetting_Failover
	failoverPriority []string // labels from failoverPriorityLabels
	// distribute, when set, replaces priorities by locality weights (Istio applies one
	// or the other); validated: "from" and "to" patterns, weights summing to 100.
	distribute []*apinet.LocalityLoadBalancerSetting_Distribute
}

// rawPriority is Istio's priority of an endpoint for a proxy, before compaction:
//
//   - without failoverPriority: 0 when region, zone and subzone match the proxy's, 1 when
//     region and zone do, 2 when the region does, 3 for a region failover names as the
//     proxy region's "to" (or any other region when failover names none for it), 4 for
//     the rest;
//   - with failoverPriority labels l1..ln: n minus the number of leading labels on which
//     the endpoint agrees with the proxy (all agree: 0), then, when failover is also
//     given, refined by the locality rule above (times 5 plus it), as Istio does.
//
// A proxy without a locality gets every endpoint at 0, unless failoverPriority names
// only labels it has (its network).
func (lp *localityPolicy) rawPriority(proxy ViewKey, e lbEndpoint) int {
	if len(lp.failoverPriority) == 0 {
		if proxy.Locality == (mesh.Locality{}) {
			return 0
		}
		return localityTier(proxy.Locality, e.Locality, lp.failover)
	}
	matched := 0
	for _, l := range lp.failoverPriority {
		var mine, theirs string
		switch l {
		case "topology.istio.io/network":
			mine, theirs = string(proxy.Network), string(cmp.Or(e.Network, proxy.Network))
		case "topology.kubernetes.io/region":
			mine, theirs = proxy.Locality.Region, e.Locality.Region
		case "topology.kubernetes.io/zone":
			mine, theirs = proxy.Locality.Zone, e.Locality.Zone
		case "topology.istio.io/subzone":
			mine, theirs = proxy.Locality.Subzone, e.Locality.Subzone
		}
		if mine == "" || mine != theirs {
			break
		}
		matched++
	}
	p := len(lp.failoverPriority) - matched
	if len(lp.failover) > 0 && proxy.Locality != (mesh.Locality{}) {
		p = p*5 + localityTier(proxy.Locality, e.Locality, lp.failover)
	}
	return p
}

// localityTier is the locality part of rawPriority.
func localityTier(mine, theirs mesh.Locality, failover []*apinet.LocalityLoadBalancerSetting_Failover) int {
	switch {
	case mine.Region != theirs.Region:
		for _, f := range failover {
			if f.GetFrom() == mine.Region {
				if f.GetTo() == theirs.Region {
					return 3
				}
				return 4
			}
		}
		return 3
	case mine.Zone != theirs.Zone:
		return 2
	case mine.Subzone != theirs.Subzone:
		return 1
	}
	return 0
}

// priorities returns each endpoint's EDS priority for proxy: rawPriority compacted to
// 0..n-1 without gaps, which both clients require. A nil policy puts everything at 0.
func (lp *localityPolicy) priorities(proxy ViewKey, eps []lbEndpoint) []uint32 {
	out := make([]uint32, len(eps))
	if lp == nil || len(lp.distribute) > 0 {
		return out
	}
	raw := make([]int, len(eps))
	for i, e := range eps {
		raw[i] = lp.rawPriority(proxy, e)
	}
	levels := slices.Compact(slices.Sorted(slices.Values(raw)))
	for i, r := range raw {
		n, _ := slices.BinarySearch(levels, r)
		out[i] = uint32(n)
	}
	return out
}

// localityWeights applies localityLbSetting.distribute for a proxy, Istio's way: the
// first entry whose "from" matches the proxy's locality gives each "to" pattern its
// weight, split over the localities the pattern matches in proportion to their own
// weights (the sum of their endpoints', rounded up); a locality no pattern matches gets
// no traffic. Patterns are applied most specific first (more fixed segments, then by
// name), so a locality two patterns match belongs to the more specific one. ok is false
// when distribute does not apply (no policy, no distribute, no proxy locality, or no
// "from" matches): every locality keeps its own weight.
func (lp *localityPolicy) localityWeights(proxy ViewKey, own map[mesh.Locality]uint32) (map[mesh.Locality]uint32, bool) {
	if lp == nil || len(lp.distribute) == 0 || proxy.Locality == (mesh.Locality{}) {
		return nil, false
	}
	for _, d := range lp.distribute {
		if !localityMatches(proxy.Locality, d.GetFrom()) {
			continue
		}
		patterns := slices.Collect(maps.Keys(d.GetTo()))
		slices.SortFunc(patterns, func(a, b string) int {
			return cmp.Or(cmp.Compare(fixedSegments(b), fixedSegments(a)), cmp.Compare(a, b))
		})
		locs := slices.SortedFunc(maps.Keys(own), func(a, b mesh.Locality) int { return cmp.Compare(a.String(), b.String()) })
		out := make(map[mesh.Locality]uint32, len(own))
		claimed := map[mesh.Locality]bool{}
		for _, p := range patterns {
			var total uint64
			var matched []mesh.Locality
			for _, l := range locs {
				if !claimed[l] && localityMatches(l, p) {
					claimed[l] = true
					matched = append(matched, l)
					total += uint64(max(own[l], 1))
				}
			}
			for _, l := range matched {
				w := (uint64(max(own[l], 1))*uint64(d.GetTo()[p]) + total - 1) / total
				if w > 0 {
					out[l] = uint32(w)
				}
			}
		}
		return out, true
	}
	return nil, false
}

// localityMatches reports whether l matches pattern "region[/zone[/subzone]]", where a
// segment "*" (or a missing trailing segment) matches anything.
func localityMatches(l mesh.Locality, pattern string) bool {
	segs := strings.Split(pattern, "/")
	have := []string{l.Region, l.Zone, l.Subzone}
	for i, s := range segs {
		if i >= 3 {
			return false
		}
		if s != "*" && s != have[i] {
			return false
		}
	}
	return true
}

// fixedSegments counts a pattern's segments that are not "*".
func fixedSegments(pattern string) int {
	n := 0
	for s := range strings.SplitSeq(pattern, "/") {
		if s != "*" {
			n++
		}
	}
	return n
}

// validateLocalityPattern checks "region[/zone[/subzone]]" with "*" allowed only as the
// last segment (Istio's rule).
func validateLocalityPattern(p string) error {
	segs := strings.Split(p, "/")
	if len(segs) > 3 {
		return fmt.Errorf("more than region/zone/subzone")
	}
	for i, s := range segs {
		switch {
		case s == "":
			return fmt.Errorf("empty segment")
		case strings.Contains(s, "*") && (s != "*" || i != len(segs)-1):
			return fmt.Errorf("a wildcard must be the whole last segment")
		}
	}
	return nil
}
