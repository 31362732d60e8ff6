package primary

import (
	"net/netip"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	corev1 "k8s.io/api/core/v1"
)

// workloadViewKey is the view cache's keyOf: viewKeyOf, plus the Workload part when a
// Sidecar with workloadSelector of the proxy's namespace selects its pod. The pod is the
// one the primary knows (podOfNode), never the node's own LABELS. Without such Sidecars
// in the namespace it is exactly viewKeyOf's key, so other proxies keep sharing views.
func (p *Primary) workloadViewKey(n *core.Node) (ViewKey, error) {
	key, err := viewKeyOf(n)
	if err != nil || (key.Kind != ProxyGRPC && key.Kind != ProxySidecar) {
		return key, err
	}
	plan := p.sidecarPlan.Load()
	if !plan.hasSelectors(key.Namespace) {
		return key, nil
	}
	if pod := p.podOfNode(n, key.Namespace); pod != nil {
		key.Workload = plan.workloadFor(key.Namespace, pod.Labels)
	}
	return key, nil
}

// podOfNode returns the pod a node names, from the watcher's cache of the node's cluster
// (CLUSTER_ID, else the primary's own): the node ID's "<pod>.<namespace>" in namespace
// ns, and only when the pod's IP is the node ID's. On the secure port authenticateNode has
// bound that pod to the caller's identity; on the plaintext port it is the node's claim.
// Nil when the node is not in Istio's form, the cluster is unknown or not synced, or no
// such pod is there. It never blocks (it is called under the view cache's lock).
func (p *Primary) podOfNode(n *core.Node, ns string) *corev1.Pod {
	claim, err := DecodeNode(n)
	if err != nil || claim.Namespace != ns {
		return nil
	}
	cluster := claim.Cluster
	if cluster == "" {
		cluster = p.cfg.ClusterID
	}
	w := p.clusters.watcher(cluster)
	if w == nil || !w.hasSynced() {
		return nil
	}
	pod := getter[*corev1.Pod](w.pods)(ns, claim.Pod)
	if pod == nil {
		return nil
	}
	if ip, err := netip.ParseAddr(pod.Status.PodIP); err != nil || ip != claim.IP {
		return nil
	}
	return pod
}
