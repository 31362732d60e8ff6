package mesh

import (
	"strings"
)

// DefaultDomain is the cluster DNS domain Kubernetes uses unless configured otherwise.
const DefaultDomain = "cluster.local"

// Hostname is a fully qualified, lowercase DNS name such as
// "echo.demo.svc.cluster.local". Services from different clusters with the same hostname
// are one service ("namespace sameness").
type Hostname string

// ParseHostname validates s as a DNS subdomain (at most 253 characters of lowercase
// labels). A single trailing dot, as in absolute DNS names, is removed. A leading "*."
// wildcard label is accepted, as ServiceEntry hosts use it.
func ParseHostname(s string) (Hostname, error) {
	in := s
	s = strings.TrimSuffix(s, ".")
	check := s
	if rest, ok := strings.CutPrefix(s, "*."); ok {
		check = rest
	}
	if err := checkDNSSubdomain("hostname", check); err != nil {
		if in == "" {
			return "", err
		}
		if pe, ok := err.(*ParseError); ok {
			pe.Input = in
		}
		return "", err
	}
	return Hostname(s), nil
}

// String returns the hostname.
func (h Hostname) String() string { return string(h) }

// ServiceKey names a Kubernetes Service by namespace and name; it is the same key in
// every cluster of a mesh.
type ServiceKey struct {
	Namespace string
	Name      string
}

// NewServiceKey validates namespace and name (both DNS labels, as Kubernetes requires of
// Service names).
func NewServiceKey(namespace, name string) (ServiceKey, error) {
	if err := checkDNSLabel("namespace", namespace); err != nil {
		return ServiceKey{}, err
	}
	if err := checkDNSLabel("service name", name); err != nil {
		return ServiceKey{}, err
	}
	return ServiceKey{Namespace: namespace, Name: name}, nil
}

// String returns "namespace/name".
func (k ServiceKey) String() string { return k.Namespace + "/" + k.Name }

// FederationDomainSuffix ends the cluster domain of the names peered meshes give each
// other's services (FederatedHostname): the importing mesh's registry, the exporting
// primary's gateway view and the gateway's peer listener all use this one spelling.
const FederationDomainSuffix = ".isthmus"

// FederatedHostname is the name every mesh peered with mesh m gives m's service k:
// <name>.<namespace>.svc.<m>.isthmus, which cannot collide with a local service
// (cluster.local) or with another peer's.
func (k ServiceKey) FederatedHostname(m MeshID) Hostname {
	return k.Hostname(string(m) + FederationDomainSuffix)
}

// Hostname returns the service's name under the given cluster domain, e.g.
// "echo.demo.svc.cluster.local". An empty domain means DefaultDomain.
func (k ServiceKey) Hostname(domain string) Hostname {
	if domain == "" {
		domain = DefaultDomain
	}
	return Hostname(k.Name + "." + k.Namespace + ".svc." + domain)
}

// ServiceKeyFromHostname reverses Hostname: it accepts "<name>.<namespace>.svc.<domain>"
// and returns the key. It fails for hostnames outside domain (such as ServiceEntry hosts).
func ServiceKeyFromHostname(h Hostname, domain string) (ServiceKey, error) {
	if domain == "" {
		domain = DefaultDomain
	}
	s := string(h)
	prefix, ok := strings.CutSuffix(s, ".svc."+domain)
	if !ok {
		return ServiceKey{}, parseErr("service hostname", s, "not under .svc.%s", domain)
	}
	name, ns, ok := strings.Cut(prefix, ".")
	if !ok {
		return ServiceKey{}, parseErr("service hostname", s, "want <name>.<namespace>.svc.%s", domain)
	}
	k, err := NewServiceKey(ns, name)
	if err != nil {
		return ServiceKey{}, parseErr("service hostname", s, "%v", err)
	}
	return k, nil
}
