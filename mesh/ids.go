package mesh

// ClusterID names one Kubernetes cluster in a mesh. It is the key of a remote secret's
// data map (so it must be a valid Secret data key) and the value of the
// topology.istio.io/cluster label; Istio's own default is "Kubernetes".
type ClusterID string

// ParseClusterID validates s as a cluster ID: 1–63 characters, letters, digits, '-', '_'
// and '.', beginning and ending with a letter or digit. This is the intersection of a
// Secret data key and a label value, the two places the ID must fit unchanged.
func ParseClusterID(s string) (ClusterID, error) {
	if err := checkLabelValue("cluster ID", s); err != nil {
		return "", err
	}
	return ClusterID(s), nil
}

// String returns the ID as given.
func (c ClusterID) String() string { return string(c) }

// NetworkID names a network: a set of workloads that reach each other directly. Pods on
// different networks talk only through east-west gateways. It is the value of the
// topology.istio.io/network label.
type NetworkID string

// ParseNetworkID validates s as a label value (1–63 characters).
func ParseNetworkID(s string) (NetworkID, error) {
	if err := checkLabelValue("network ID", s); err != nil {
		return "", err
	}
	return NetworkID(s), nil
}

// String returns the ID as given.
func (n NetworkID) String() string { return string(n) }

// MeshID names one mesh: the unit of administration that peers with other meshes.
type MeshID string

// ParseMeshID validates s as a label value (1–63 characters).
func ParseMeshID(s string) (MeshID, error) {
	if err := checkLabelValue("mesh ID", s); err != nil {
		return "", err
	}
	return MeshID(s), nil
}

// String returns the ID as given.
func (m MeshID) String() string { return string(m) }

// TrustDomain is the authority part of a SPIFFE ID: the set of identities one root of
// trust vouches for, e.g. "cluster.local".
type TrustDomain string

// ParseTrustDomain validates s per the SPIFFE ID specification: 1–255 characters of
// lowercase letters, digits, '.', '-' and '_'. Uppercase is refused rather than folded,
// because two spellings of one domain would otherwise compare unequal elsewhere.
func ParseTrustDomain(s string) (TrustDomain, error) {
	if s == "" {
		return "", &ParseError{Kind: "trust domain", Input: s, Err: ErrEmpty}
	}
	if len(s) > 255 {
		return "", parseErr("trust domain", s, "longer than 255 characters (%d)", len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isLowerAlnum(c) || c == '.' || c == '-' || c == '_' {
			continue
		}
		return "", parseErr("trust domain", s, "character %q at %d is not allowed (lowercase letters, digits, '.', '-', '_')", c, i)
	}
	return TrustDomain(s), nil
}

// String returns the trust domain name.
func (t TrustDomain) String() string { return string(t) }

// IDString returns the SPIFFE ID of the trust domain itself, "spiffe://<td>".
func (t TrustDomain) IDString() string { return "spiffe://" + string(t) }
