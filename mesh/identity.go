package mesh

import "strings"

// Identity is a workload's SPIFFE identity in the Istio form
// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
type Identity struct {
	TrustDomain    TrustDomain
	Namespace      string
	ServiceAccount string
}

// NewIdentity validates the parts and returns the identity.
func NewIdentity(td TrustDomain, namespace, serviceAccount string) (Identity, error) {
	id := Identity{TrustDomain: td, Namespace: namespace, ServiceAccount: serviceAccount}
	if _, err := ParseTrustDomain(string(td)); err != nil {
		return Identity{}, err
	}
	if err := checkDNSLabel("namespace", namespace); err != nil {
		return Identity{}, err
	}
	if err := checkDNSSubdomain("service account", serviceAccount); err != nil {
		return Identity{}, err
	}
	return id, nil
}

// ParseIdentity parses a SPIFFE ID of the form spiffe://<td>/ns/<ns>/sa/<sa>. Other
// SPIFFE path shapes are refused: Isthmus issues and authorizes only this form.
func ParseIdentity(s string) (Identity, error) {
	const kind = "SPIFFE identity"
	if s == "" {
		return Identity{}, &ParseError{Kind: kind, Input: s, Err: ErrEmpty}
	}
	rest, ok := strings.CutPrefix(s, "spiffe://")
	if !ok {
		return Identity{}, parseErr(kind, s, `must start with "spiffe://"`)
	}
	td, path, ok := strings.Cut(rest, "/")
	if !ok {
		return Identity{}, parseErr(kind, s, "no path: want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return Identity{}, parseErr(kind, s, "path %q is not /ns/<namespace>/sa/<service-account>", "/"+path)
	}
	tdv, err := ParseTrustDomain(td)
	if err != nil {
		return Identity{}, parseErr(kind, s, "%v", err)
	}
	id, err := NewIdentity(tdv, parts[1], parts[3])
	if err != nil {
		return Identity{}, parseErr(kind, s, "%v", err)
	}
	return id, nil
}

// IsZero reports whether the identity is unset.
func (i Identity) IsZero() bool { return i == Identity{} }

// String returns the SPIFFE ID, or "" for the zero identity.
func (i Identity) String() string {
	if i.IsZero() {
		return ""
	}
	return "spiffe://" + string(i.TrustDomain) + "/ns/" + i.Namespace + "/sa/" + i.ServiceAccount
}
