package mesh

import "strings"

// Locality is where a workload runs, from the node's topology.kubernetes.io/region and
// topology.kubernetes.io/zone labels and Istio's topology.istio.io/subzone. Each part may be
// empty; a zone without a region is not meaningful and is refused by ParseLocality.
type Locality struct {
	Region  string
	Zone    string
	Subzone string
}

// ParseLocality parses "region", "region/zone" or "region/zone/subzone" (the form Istio
// uses in istio-locality labels and locality load-balancing settings). The empty string is
// the zero Locality.
func ParseLocality(s string) (Locality, error) {
	const kind = "locality"
	if s == "" {
		return Locality{}, nil
	}
	parts := strings.Split(s, "/")
	if len(parts) > 3 {
		return Locality{}, parseErr(kind, s, "more than three parts (region/zone/subzone)")
	}
	for i, p := range parts {
		if p == "" {
			return Locality{}, parseErr(kind, s, "part %d is empty", i+1)
		}
		if err := checkLabelValue(kind, p); err != nil {
			return Locality{}, parseErr(kind, s, "part %q: %v", p, reason(err))
		}
	}
	var l Locality
	l.Region = parts[0]
	if len(parts) > 1 {
		l.Zone = parts[1]
	}
	if len(parts) > 2 {
		l.Subzone = parts[2]
	}
	return l, nil
}

// String returns the "region/zone/subzone" form, omitting empty trailing parts.
func (l Locality) String() string {
	switch {
	case l.Subzone != "":
		return l.Region + "/" + l.Zone + "/" + l.Subzone
	case l.Zone != "":
		return l.Region + "/" + l.Zone
	default:
		return l.Region
	}
}
