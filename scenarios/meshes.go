package scenarios

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// A federation of meshes (docs/federation.md): a topology with meshes lists whole meshes,
// each with its own mesh ID, trust domain and root, and every cluster names its mesh.
// Primaries link (remote secrets) only to clusters of their own mesh. The first primary
// cluster of each mesh runs the mesh's federation endpoint (`isthmus primary
// --federation-addr`, with --federation-trust-peers so the peers' bundles reach the
// workloads); each network with a gateway serves peers on the gateway's federation
// listener, a second address of the gateway's namespace that every network reaches, while
// the in-mesh listener is routed only from the networks of its own mesh. Peerings are made
// with a token from the accepting mesh's admin socket; exports are an MCS ServiceExport
// in the exporting mesh's federation cluster plus the mesh's export policy.

// PeeringSpec is one peering: To's mesh creates a token naming From, and From's mesh
// establishes it (From dials To).
type PeeringSpec struct {
	From string `json:"from"`
	To   string `json:"to"`
}

// ExportSpec exports a service of Mesh to the peers listed in To.
type ExportSpec struct {
	Mesh string `json:"mesh"`
	// Service is "<name>.<namespace>" of a workload.
	Service string   `json:"service"`
	To      []string `json:"to"`
}

// FederationPort is the port of a gateway's federation listener (`isthmus gateway
// --federation-listen`) on its federation address.
const FederationPort = 15443

// validateMeshes checks meshes, clusters' meshes, peerings, exports and cross-mesh
// expectations, and fills each cluster's trust domain from its mesh.
func (t *Topology) validateMeshes(add func(string, ...any)) {
	if len(t.Meshes) == 0 {
		for i, c := range t.Clusters {
			if c.Mesh != "" {
				add("clusters[%d].mesh: %q names a mesh, but the topology lists no meshes", i, c.Mesh)
			}
		}
		if len(t.Peerings) > 0 || len(t.Exports) > 0 {
			add("peerings/exports: need meshes (a federation of whole meshes)")
		}
		for i, e := range t.Expect {
			if e.Mesh != "" {
				add("expect[%d].mesh: %q, but the topology lists no meshes", i, e.Mesh)
			}
		}
		return
	}
	meshes := map[string]MeshSpec{}
	domains := map[string]string{}
	for i, m := range t.Meshes {
		if _, err := mesh.ParseMeshID(m.ID); err != nil {
			add("meshes[%d].id: %v", i, err)
		} else if err := checkName(m.ID); err != nil {
			add("meshes[%d].id: %v", i, err)
		} else if _, dup := meshes[m.ID]; dup {
			add("meshes[%d].id: duplicate mesh %q", i, m.ID)
		}
		if _, err := mesh.ParseTrustDomain(m.TrustDomain); err != nil {
			add("meshes[%d].trustDomain: %v", i, err)
		} else if other, dup := domains[m.TrustDomain]; dup {
			add("meshes[%d].trustDomain: %q is also mesh %q's; meshes federate between trust domains", i, m.TrustDomain, other)
		}
		meshes[m.ID], domains[m.TrustDomain] = m, m.ID
	}
	if t.Trust == TrustMulti || len(t.Federation) > 0 {
		add("trust: with meshes each mesh has one root and trust domain; peers' bundles come from peering (leave trust and federation unset)")
	}
	if len(t.Faults) > 0 || t.Traffic != nil {
		add("faults/traffic: not supported with meshes")
	}
	networkMesh := map[string]string{}
	for i, c := range t.Clusters {
		m, ok := meshes[c.Mesh]
		if !ok {
			add("clusters[%d].mesh: %q is not one of meshes", i, c.Mesh)
			continue
		}
		if c.TrustDomain == "" {
			t.Clusters[i].TrustDomain = m.TrustDomain
		} else if c.TrustDomain != m.TrustDomain {
			add("clusters[%d].trustDomain: %q differs from mesh %s's %q", i, c.TrustDomain, m.ID, m.TrustDomain)
		}
		if other, ok := networkMesh[c.Network]; ok && other != c.Mesh {
			add("clusters[%d].network: network %q is already mesh %q's; meshes do not share networks", i, c.Network, other)
		}
		networkMesh[c.Network] = c.Mesh
		if c.ControlPlane.Role == RoleRemote {
			if p, ok := t.Cluster(c.ControlPlane.Primary); ok && p.Mesh != c.Mesh {
				add("clusters[%d].controlPlane.primary: %q is in mesh %q, not %q", i, p.Name, p.Mesh, c.Mesh)
			}
		}
	}
	for _, m := range t.Meshes {
		if t.FederationCluster(m.ID) == "" {
			add("meshes: mesh %q has no primary cluster to run its federation endpoint", m.ID)
		}
	}
	seen := map[[2]string]bool{}
	for i, p := range t.Peerings {
		_, okF := meshes[p.From]
		_, okT := meshes[p.To]
		switch {
		case !okF:
			add("peerings[%d].from: unknown mesh %q", i, p.From)
		case !okT:
			add("peerings[%d].to: unknown mesh %q", i, p.To)
		case p.From == p.To:
			add("peerings[%d]: a mesh does not peer with itself", i)
		case seen[[2]string{p.From, p.To}] || seen[[2]string{p.To, p.From}]:
			add("peerings[%d]: %s and %s are already peered", i, p.From, p.To)
		}
		seen[[2]string{p.From, p.To}] = true
	}
	services := map[string]WorkloadSpec{}
	for _, w := range t.Workloads {
		services[w.Service+"."+w.Namespace] = w
	}
	for i, e := range t.Exports {
		if _, ok := meshes[e.Mesh]; !ok {
			add("exports[%d].mesh: unknown mesh %q", i, e.Mesh)
			continue
		}
		if _, ok := services[e.Service]; !ok {
			add("exports[%d].service: unknown service %q (want <name>.<namespace> of a workload)", i, e.Service)
		}
		if len(t.meshGateways(e.Mesh)) == 0 {
			add("exports[%d]: mesh %q has no network with a gateway for peers to reach its services through", i, e.Mesh)
		}
		if len(e.To) == 0 {
			add("exports[%d].to: name at least one peer mesh", i)
		}
		for _, to := range e.To {
			if !t.Peered(e.Mesh, to) {
				add("exports[%d].to: mesh %q is not peered with %q", i, to, e.Mesh)
			}
		}
	}
	for i, e := range t.Expect {
		if e.Mesh == "" {
			continue
		}
		if _, ok := meshes[e.Mesh]; !ok {
			add("expect[%d].mesh: unknown mesh %q", i, e.Mesh)
		}
	}
}

// MeshOf returns the mesh of a cluster: its own in a topology of meshes, else the
// topology's one mesh.
func (t *Topology) MeshOf(cluster string) MeshSpec {
	c, _ := t.Cluster(cluster)
	for _, m := range t.Meshes {
		if m.ID == c.Mesh {
			return m
		}
	}
	return t.Mesh
}

// FederationCluster returns the cluster whose primary runs mesh's federation endpoint:
// the mesh's first primary cluster, or "".
func (t *Topology) FederationCluster(meshID string) string {
	for _, c := range t.Clusters {
		if c.Mesh == meshID && c.ControlPlane.Role == RolePrimary {
			return c.Name
		}
	}
	return ""
}

// Peered reports whether the topology peers meshes a and b (either direction).
func (t *Topology) Peered(a, b string) bool {
	return slices.ContainsFunc(t.Peerings, func(p PeeringSpec) bool { return p.From == a && p.To == b || p.From == b && p.To == a })
}

// ExportedTo reports whether the topology exports service of meshID to peer.
func (t *Topology) ExportedTo(meshID, service, peer string) bool {
	return slices.ContainsFunc(t.Exports, func(e ExportSpec) bool {
		return e.Mesh == meshID && e.Service == service && slices.Contains(e.To, peer)
	})
}

// meshGateways returns the networks of meshID's clusters that have a gateway.
func (t *Topology) meshGateways(meshID string) []string {
	var out []string
	for _, c := range t.Clusters {
		if n, ok := t.Network(c.Network); ok && c.Mesh == meshID && n.Gateway && !slices.Contains(out, n.Name) {
			out = append(out, n.Name)
		}
	}
	return out
}

// sameMesh reports whether clusters a and b are in one mesh.
func (t *Topology) sameMesh(a, b string) bool {
	ca, _ := t.Cluster(a)
	cb, _ := t.Cluster(b)
	return ca.Mesh == cb.Mesh
}

// federationAddress is where network's gateway serves peer meshes: 100.64.254.<g> (its
// in-mesh address is 100.64.255.<g>), port FederationPort.
func (t *Topology) federationAddress(network string) netip.AddrPort {
	for i, n := range t.Networks {
		if n.Name == network {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{100, 64, 254, byte(i + 1)}), FederationPort)
		}
	}
	return netip.AddrPort{}
}

// ImportHostname returns the name clients of other meshes call service ("<name>.<ns>")
// of meshID by: <name>.<ns>.svc.<mesh>.isthmus.
func ImportHostname(service, meshID string) string {
	name, ns, _ := cutService(service)
	return string(mesh.ServiceKey{Namespace: ns, Name: name}.FederatedHostname(mesh.MeshID(meshID)))
}

// followFederation makes the primary of c, which is not its mesh's federation cluster,
// follow the mesh's federation endpoint (started before it: the federation cluster is
// the mesh's first primary), so that the mesh's imports and peers' bundles reach c too.
func (r *Run) followFederation(spec *PrimarySpec, c ClusterSpec, progress func(string)) {
	fc := r.Topology.FederationCluster(c.Mesh)
	if p := r.Primaries[fc]; p != nil && p.Addresses["federation"] != "" {
		spec.FederationFollow = p.Addresses["federation"]
		progress(fmt.Sprintf("the primary of %s follows mesh %s's federation endpoint in %s", c.Name, c.Mesh, fc))
	}
}

// federationDir is where the federation cluster's primary keeps its federation state and
// admin socket.
func (r *Run) federationDir(cluster string) string {
	return filepath.Join(r.Dir, "federation", cluster)
}

// Admin returns the admin client of meshID's federation endpoint (its admin socket).
func (r *Run) Admin(meshID string) (federation.AdminClient, error) {
	c := r.Topology.FederationCluster(meshID)
	if c == "" || r.Primaries[c] == nil {
		return federation.AdminClient{}, fmt.Errorf("scenarios: mesh %q runs no federation endpoint", meshID)
	}
	return federation.AdminClient{Socket: filepath.Join(r.federationDir(c), "admin.sock")}, nil
}

// Peer peers mesh from with mesh to as `isthmus mesh peering token create --peer FROM`
// on to's side and `establish --token` on from's do, and waits until both sides are
// ACTIVE.
func (r *Run) Peer(ctx context.Context, from, to string) error {
	acc, err := r.Admin(to)
	if err != nil {
		return err
	}
	dial, err := r.Admin(from)
	if err != nil {
		return err
	}
	token, _, err := acc.CreateToken(ctx, from)
	if err != nil {
		return fmt.Errorf("scenarios: peering token of %s for %s: %w", to, from, err)
	}
	if _, err := dial.Establish(ctx, token, to); err != nil {
		return fmt.Errorf("scenarios: %s establishes the peering with %s: %w", from, to, err)
	}
	for _, w := range []struct {
		c    federation.AdminClient
		name string
	}{{acc, from}, {dial, to}} {
		if err := waitPeering(ctx, w.c, w.name, federation.StateActive, 60*time.Second); err != nil {
			return fmt.Errorf("scenarios: peering %s ↔ %s: %w", from, to, err)
		}
	}
	return nil
}

// DeletePeering deletes meshID's peering with peer (`isthmus mesh peering delete`).
func (r *Run) DeletePeering(ctx context.Context, meshID, peer string) error {
	c, err := r.Admin(meshID)
	if err != nil {
		return err
	}
	_, err = c.Delete(ctx, peer)
	return err
}

// PeeringState returns meshID's peering with peer as its endpoint shows it.
func (r *Run) PeeringState(ctx context.Context, meshID, peer string) (federation.Peering, error) {
	c, err := r.Admin(meshID)
	if err != nil {
		return federation.Peering{}, err
	}
	return c.Show(ctx, peer)
}

func waitPeering(ctx context.Context, c federation.AdminClient, name string, want federation.State, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		p, err := c.Show(ctx, name)
		if err == nil && p.State == want {
			return nil
		}
		if time.Now().After(deadline) {
			if err != nil {
				return err
			}
			return fmt.Errorf("peering %s is %s (%s), not %s after %s", name, p.State, p.Reason, want, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// mcs returns the MCS client of a cluster.
func (r *Run) mcs(cluster string) (mcsclient.Interface, error) {
	c, err := r.clusterByName(cluster)
	if err != nil {
		return nil, err
	}
	return mcsclient.NewForConfig(c.REST)
}

// Export exports service ("<name>.<ns>") of meshID: a ServiceExport in its federation
// cluster, and the export policy rule for each peer and the service's namespace.
func (r *Run) Export(ctx context.Context, meshID, service string, to []string) error {
	name, ns, _ := cutService(service)
	fc := r.Topology.FederationCluster(meshID)
	cl, err := r.clusterByName(fc)
	if err != nil {
		return err
	}
	if err := r.updatePolicy(ctx, cl, func(p *federation.ExportPolicy) {
		for _, peer := range to {
			i := slices.IndexFunc(p.Rules, func(r federation.ExportRule) bool { return string(r.Peer) == peer })
			if i < 0 {
				p.Rules = append(p.Rules, federation.ExportRule{Peer: mesh.MeshID(peer)})
				i = len(p.Rules) - 1
			}
			if !slices.Contains(p.Rules[i].Namespaces, ns) {
				p.Rules[i].Namespaces = append(p.Rules[i].Namespaces, ns)
			}
		}
	}); err != nil {
		return err
	}
	mc, err := r.mcs(fc)
	if err != nil {
		return err
	}
	_, err = mc.MulticlusterV1alpha1().ServiceExports(ns).Create(ctx, &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// Unexport deletes service's ServiceExport in meshID's federation cluster (the policy
// stays: it names namespaces, not services).
func (r *Run) Unexport(ctx context.Context, meshID, service string) error {
	name, ns, _ := cutService(service)
	mc, err := r.mcs(r.Topology.FederationCluster(meshID))
	if err != nil {
		return err
	}
	return mc.MulticlusterV1alpha1().ServiceExports(ns).Delete(ctx, name, metav1.DeleteOptions{})
}

func (r *Run) updatePolicy(ctx context.Context, cl *Cluster, edit func(*federation.ExportPolicy)) error {
	cms := cl.Client.CoreV1().ConfigMaps(SystemNamespace)
	cm, err := cms.Get(ctx, federation.ExportPolicyConfigMap, metav1.GetOptions{})
	create := apierrors.IsNotFound(err)
	if err != nil && !create {
		return err
	}
	var p federation.ExportPolicy
	if create {
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: federation.ExportPolicyConfigMap, Namespace: SystemNamespace}}
	} else if p, err = federation.ParseExportPolicy(cm.Data["policy"]); err != nil {
		return err
	}
	edit(&p)
	raw, err := json.Marshal(p)
	if err != nil {
		return err
	}
	cm.Data = map[string]string{"policy": string(raw)}
	if create {
		_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
	} else {
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	return err
}

// federateMeshes makes the topology's exports and peerings.
func (r *Run) federateMeshes(ctx context.Context, progress func(string)) error {
	for _, e := range r.Topology.Exports {
		progress(fmt.Sprintf("exporting %s of %s to %v (ServiceExport and export policy in %s)", e.Service, e.Mesh, e.To, r.Topology.FederationCluster(e.Mesh)))
		if err := r.Export(ctx, e.Mesh, e.Service, e.To); err != nil {
			return fmt.Errorf("scenarios: export %s of %s: %w", e.Service, e.Mesh, err)
		}
	}
	for _, p := range r.Topology.Peerings {
		progress(fmt.Sprintf("peering %s → %s: a token from %s's admin socket, established by %s", p.From, p.To, p.To, p.From))
		if err := r.Peer(ctx, p.From, p.To); err != nil {
			return err
		}
	}
	return nil
}

// crossMeshCells lists, for a client in from, the services of other meshes it calls:
// every workload with replicas in another mesh, by that mesh.
func (t *Topology) crossMeshCells(from string) []Expectation {
	var out []Expectation
	fm := t.MeshOf(from).ID
	for _, m := range t.Meshes {
		if m.ID == fm {
			continue
		}
		for _, w := range t.Workloads {
			for c, n := range w.Replicas {
				if cl, _ := t.Cluster(c); cl.Mesh == m.ID && n > 0 {
					out = append(out, Expectation{From: from, Service: w.Service + "." + w.Namespace, Mesh: m.ID})
					break
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b Expectation) int {
		return cmp.Or(cmp.Compare(a.Mesh, b.Mesh), cmp.Compare(a.Service, b.Service))
	})
	return out
}
