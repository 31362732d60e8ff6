package scenarios

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// TrustMulti gives every trust domain its own root (clusters of one domain share it, an
// intermediate each); domains trust each other only through the bundles their primaries
// publish on their bundle endpoints and fetch as Federation says — never a merged root.
const TrustMulti = "multi"

// MultiTrust is two clusters on two networks, each with its own root and trust domain,
// federated through their primaries' bundle endpoints.
func MultiTrust() (*Topology, error) { return Builtin("multi-trust") }

// FederationSpec is one federation relationship: the primary of cluster From fetches the
// bundle of cluster To's trust domain from To's primary's bundle endpoint (https_spiffe),
// and From's workloads then accept To's identities.
type FederationSpec struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// validateTrust checks the trust model, fills each cluster's trust domain (default the
// mesh's) and checks the federation relationships and identity expectations.
func (t *Topology) validateTrust(add func(string, ...any)) {
	if t.Trust == "" {
		t.Trust = TrustSingle
	}
	switch t.Trust {
	case TrustSingle, TrustMulti:
	default:
		add("trust: %q is not a supported trust model (want %q or %q)", t.Trust, TrustSingle, TrustMulti)
	}
	for i, c := range t.Clusters {
		if c.TrustDomain == "" {
			t.Clusters[i].TrustDomain = t.Mesh.TrustDomain
			continue
		}
		if _, err := mesh.ParseTrustDomain(c.TrustDomain); err != nil {
			add("clusters[%d].trustDomain: %v", i, err)
		} else if m := t.MeshOf(c.Name); t.Trust == TrustSingle && c.TrustDomain != m.TrustDomain {
			add("clusters[%d].trustDomain: %q differs from the mesh's %q; one root means one trust domain (use trust: %s)", i, c.TrustDomain, m.TrustDomain, TrustMulti)
		}
	}
	if len(t.Federation) > 0 && t.Trust != TrustMulti {
		add("federation: relationships need trust: %s", TrustMulti)
	}
	seen := map[FederationSpec]bool{}
	for i, f := range t.Federation {
		from, okF := t.Cluster(f.From)
		to, okT := t.Cluster(f.To)
		switch {
		case !okF:
			add("federation[%d].from: unknown cluster %q", i, f.From)
		case !okT:
			add("federation[%d].to: unknown cluster %q", i, f.To)
		case from.ControlPlane.Role != RolePrimary || to.ControlPlane.Role != RolePrimary:
			add("federation[%d]: both clusters must run a primary (it serves and fetches the bundles)", i)
		case from.TrustDomain == to.TrustDomain:
			add("federation[%d]: %s and %s share trust domain %q; federation is between domains", i, f.From, f.To, from.TrustDomain)
		case seen[f]:
			add("federation[%d]: %s → %s is listed twice", i, f.From, f.To)
		}
		seen[f] = true
	}
	for i, f := range t.Faults {
		if f.Kind == FaultRootRotation && t.Trust == TrustMulti {
			// The fault rotates one root over every primary's CA; with a root per domain
			// that would put one domain's root into another's CA.
			add("faults[%d]: %s rotates the mesh's one root; with trust: %s each domain rotates its own (trust.Rotate with Peers, as TestMultiTrustRotation does)", i, FaultRootRotation, TrustMulti)
		}
	}
	for i, e := range t.Expect {
		if e.CallerIdentity != "" {
			if _, err := mesh.ParseIdentity(e.CallerIdentity); err != nil {
				add("expect[%d].callerIdentity: %v", i, err)
			}
		}
		for c, id := range e.ServerIdentities {
			if _, ok := t.Cluster(c); !ok {
				add("expect[%d].serverIdentities: unknown cluster %q", i, c)
			}
			if _, err := mesh.ParseIdentity(id); err != nil {
				add("expect[%d].serverIdentities[%s]: %v", i, c, err)
			}
		}
	}
}

// TrustDomainOf returns the trust domain of a cluster's workloads.
func (t *Topology) TrustDomainOf(cluster string) mesh.TrustDomain {
	if c, ok := t.Cluster(cluster); ok && c.TrustDomain != "" {
		return mesh.TrustDomain(c.TrustDomain)
	}
	return mesh.TrustDomain(t.Mesh.TrustDomain)
}

// IdentityIn returns the SPIFFE ID of a service account in a cluster's trust domain.
func (r *Run) IdentityIn(cluster, namespace, serviceAccount string) string {
	return "spiffe://" + string(r.Topology.TrustDomainOf(cluster)) + "/ns/" + namespace + "/sa/" + serviceAccount
}

// expectedIdentities returns the identities a probe from cluster from to service must see:
// the servers' (one per cluster that may answer, in that cluster's domain) and the caller's
// (the probe client's, in from's domain), unless the expectation names them.
func (r *Run) expectedIdentities(from, service, meshID string, hops []Hop) (servers []string, caller string) {
	name, namespace, _ := cutService(service)
	caller = r.IdentityIn(from, ClientNamespace, ClientServiceAccount)
	named := map[string]string{}
	for _, e := range r.Topology.Expect {
		if e.From == from && e.Service == service && e.Mesh == meshID {
			if e.CallerIdentity != "" {
				caller = e.CallerIdentity
			}
			named = e.ServerIdentities
		}
	}
	for _, h := range hops {
		id := r.IdentityIn(h.Cluster, namespace, name) // each workload runs as a service account named after its service
		if n, ok := named[h.Cluster]; ok {
			id = n
		}
		if !slices.Contains(servers, id) {
			servers = append(servers, id)
		}
	}
	slices.Sort(servers)
	return servers, caller
}

// setupTrust makes the roots and each primary's plug-in CA directory: one root for the mesh
// (single), or one per trust domain (multi); an intermediate per primary cluster. It
// returns the CA directories by cluster.
func (r *Run) setupTrust(progress func(string)) (map[string]string, error) {
	t := r.Topology
	if len(t.Meshes) > 0 {
		progress("trust: a root per mesh (its trust domain), an intermediate per primary; meshes exchange bundles when they peer")
	} else if t.Trust == TrustMulti {
		progress("trust: a root per trust domain, an intermediate per primary; domains federate through bundle endpoints")
	} else {
		progress(fmt.Sprintf("trust: one root for %s, an intermediate per primary", t.Mesh.TrustDomain))
	}
	roots := map[mesh.TrustDomain]*trust.Authority{}
	r.rootCerts = map[string]string{}
	caDirs := map[string]string{}
	for _, c := range t.Clusters {
		if c.ControlPlane.Role != RolePrimary && c.ControlPlane.Role != RoleConfig {
			continue
		}
		td := t.TrustDomainOf(c.Name)
		root, ok := roots[td]
		if !ok {
			var err error
			if root, err = trust.NewRoot(td, trust.RootOptions{}); err != nil {
				return nil, err
			}
			roots[td] = root
			file := filepath.Join(r.Dir, "trust", "root-cert."+string(td)+".pem")
			if len(roots) == 1 { // the first root; with trust: single (one mesh) the only one
				r.RootCert = filepath.Join(r.Dir, "trust", "root-cert.pem")
				file = r.RootCert
			}
			if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
				return nil, err
			}
			if err := os.WriteFile(file, root.RootPEM(), 0o644); err != nil {
				return nil, err
			}
			r.rootFiles = setDefault(r.rootFiles, string(td), file)
		}
		r.rootCerts[c.Name] = r.rootFiles[string(td)]
		inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: mesh.ClusterID(c.Name)})
		if err != nil {
			return nil, err
		}
		caDirs[c.Name] = filepath.Join(r.Dir, "trust", c.Name)
		if err := inter.WriteDir(caDirs[c.Name]); err != nil {
			return nil, err
		}
	}
	return caDirs, nil
}

func setDefault(m map[string]string, k, v string) map[string]string {
	if m == nil {
		m = map[string]string{}
	}
	m[k] = v
	return m
}

// RootCertOf returns the file of the root a cluster's CA chains to (the CA's serving
// certificate verifies under it).
func (r *Run) RootCertOf(cluster string) string {
	if f, ok := r.rootCerts[cluster]; ok {
		return f
	}
	return r.RootCert
}

// Federate writes the federation relationship from → to into from's cluster, as
// `isthmus trust federate add` does: to's primary's bundle endpoint, https_spiffe, the
// endpoint's SPIFFE ID, to's root as the bootstrap bundle.
func (r *Run) Federate(ctx context.Context, from, to string) error {
	rel, err := r.relationship(to)
	if err != nil {
		return err
	}
	c, err := r.clusterByName(from)
	if err != nil {
		return err
	}
	_, err = trust.FederationStore{Client: c.Client, Namespace: SystemNamespace}.Update(ctx, func(rels []trust.Relationship) ([]trust.Relationship, error) {
		return trust.AddRelationship(rels, rel, r.Topology.TrustDomainOf(from))
	})
	if err != nil {
		return fmt.Errorf("scenarios: federate %s → %s: %w", from, to, err)
	}
	return nil
}

// Unfederate removes from's relationship with to's trust domain, as `isthmus trust
// federate remove` does: the relationship, and the domain's bundle from the store.
func (r *Run) Unfederate(ctx context.Context, from, to string) error {
	c, err := r.clusterByName(from)
	if err != nil {
		return err
	}
	td := r.Topology.TrustDomainOf(to)
	if _, err := (trust.FederationStore{Client: c.Client, Namespace: SystemNamespace}).Update(ctx, func(rels []trust.Relationship) ([]trust.Relationship, error) {
		return trust.RemoveRelationship(rels, td)
	}); err != nil {
		return fmt.Errorf("scenarios: unfederate %s → %s: %w", from, to, err)
	}
	_, err = trust.BundleStore{Client: c.Client, Namespace: SystemNamespace}.Update(ctx, func(set *trust.BundleSet) error {
		set.Remove(td)
		return nil
	})
	return err
}

func (r *Run) relationship(to string) (trust.Relationship, error) {
	pc, ok := r.Primaries[to]
	if !ok || pc.Addresses["bundle"] == "" {
		return trust.Relationship{}, fmt.Errorf("scenarios: %s runs no primary with a bundle endpoint", to)
	}
	td := r.Topology.TrustDomainOf(to)
	id, err := trust.EndpointIdentity(td, SystemNamespace)
	if err != nil {
		return trust.Relationship{}, err
	}
	pemData, err := os.ReadFile(r.RootCertOf(to))
	if err != nil {
		return trust.Relationship{}, err
	}
	b, err := trust.ParsePEMBundle(td, pemData)
	if err != nil {
		return trust.Relationship{}, err
	}
	raw, err := b.Marshal()
	if err != nil {
		return trust.Relationship{}, err
	}
	return trust.Relationship{TrustDomain: string(td), EndpointURL: "https://" + pc.Addresses["bundle"] + "/", Profile: trust.ProfileSPIFFE,
		EndpointSPIFFEID: id.String(), BootstrapBundle: string(raw)}, nil
}

func (r *Run) clusterByName(name string) (*Cluster, error) {
	for _, c := range r.Env.Clusters() {
		if c.Name == name {
			return c, nil
		}
	}
	return nil, fmt.Errorf("scenarios: no cluster %q", name)
}

// federateAll writes every relationship of the topology.
func (r *Run) federateAll(ctx context.Context, progress func(string)) error {
	for _, f := range r.Topology.Federation {
		progress(fmt.Sprintf("federating %s → %s: %s's primary fetches %s's bundle from its bundle endpoint", f.From, f.To, f.From, r.Topology.TrustDomainOf(f.To)))
		if err := r.Federate(ctx, f.From, f.To); err != nil {
			return err
		}
	}
	return nil
}

func cutService(service string) (name, namespace string, ok bool) {
	for i := 0; i < len(service); i++ {
		if service[i] == '.' {
			return service[:i], service[i+1:], true
		}
	}
	return service, "", false
}
