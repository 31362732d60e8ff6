package primary

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Authenticator proves who is on the other end of an xDS stream. The CA server
// implements it (cmd plugs it in), so the secure xDS port and the CSR API accept the same
// credentials and share one TokenReview cache.
type Authenticator interface {
	// Authenticate returns the caller's identity: from a client certificate that chains
	// to the mesh roots (certificate true), else from the service-account token in the
	// gRPC metadata "authorization: Bearer <token>", reviewed by the API server of
	// cluster. Errors are gRPC status errors: Unauthenticated for missing or rejected
	// credentials, Unavailable when the review could not be made.
	Authenticate(ctx context.Context, cluster mesh.ClusterID) (id mesh.Identity, certificate bool, err error)
}

// Auth methods recorded on an authenticated Proxy.
const (
	AuthCertificate = "certificate"
	AuthToken       = "token"
	AuthNone        = "none" // the plaintext port, enabled explicitly
)

// Refusal reasons, the values of isthmus_primary_xds_auth_refused_total{reason}.
const (
	refuseBadNode        = "bad_node"        // InvalidArgument: the node cannot be decoded
	refuseUnauthed       = "unauthenticated" // Unauthenticated: no or rejected credentials
	refuseUnknownCluster = "unknown_cluster" // Unauthenticated: a cluster the primary has no link to
	refuseUnavailable    = "unavailable"     // Unavailable: review or cluster not ready
	refuseTrustDomain    = "trust_domain"    // PermissionDenied: an identity of another trust domain
	refuseNamespace      = "namespace"       // PermissionDenied: the node claims another namespace
	refuseServiceAccount = "service_account" // PermissionDenied: the node or its pod names another SA
	refuseGateway        = "gateway"         // PermissionDenied: a router outside the system namespace
	refuseNetwork        = "network"         // PermissionDenied: the node claims another network
	refusePod            = "pod"             // PermissionDenied: a certificate caller whose pod is not in that cluster
	refuseNodeChanged    = "node_changed"    // PermissionDenied: a later request names another node
)

// refusal is a refused stream: the gRPC status the client gets and the metric label.
type refusal struct {
	reason string
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }

// GRPCStatus makes the stream end with the refusal's code.
func (r *refusal) GRPCStatus() *status.Status { s, _ := status.FromError(r.err); return s }

func refuse(reason string, code codes.Code, format string, args ...any) *refusal {
	return &refusal{reason: reason, err: status.Errorf(code, "primary: xDS: "+format, args...)}
}

// authMetrics count the secure port's decisions.
type authMetrics struct {
	refused  *prometheus.CounterVec
	accepted *prometheus.CounterVec
}

func newAuthMetrics(reg prometheus.Registerer) (*authMetrics, error) {
	m := &authMetrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_primary_xds_auth_refused_total",
			Help: "xDS streams refused on the secure port, by reason."}, []string{"reason"}),
		accepted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "isthmus_primary_xds_authenticated_total",
			Help: "xDS streams authenticated on the secure port, by method (certificate, token)."}, []string{"method"}),
	}
	for _, c := range []prometheus.Collector{m.refused, m.accepted} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// authenticateNode decodes a stream's node, authenticates the caller and binds the one to
// the other. The rules, each a refusal with its reason:
//
//   - the node decodes strictly (DecodeNode); its cluster is CLUSTER_ID, or the primary's
//     own cluster when absent, and must be a cluster the primary links to;
//   - a token is reviewed in that cluster, so the cluster is proven; a certificate names
//     no cluster, so its pod (the node's pod and namespace) must exist there, run as the
//     certificate's service account and, when the pod has an address, at the node's IP;
//   - the identity is in the primary's trust domain, its namespace is the node's, its
//     service account the node's SERVICE_ACCOUNT (when sent) and the pod's (when the pod
//     is known);
//   - a router (gateway) runs in the system namespace;
//   - the node's NETWORK is the network the primary assigns to that pod in that cluster
//     (pod label, namespace label, CIDR map, the cluster's network), exactly: claiming
//     none while the cluster has one is claiming another network.
func (p *Primary) authenticateNode(ctx context.Context, a Authenticator, claim NodeClaim) (Proxy, *refusal) {
	cluster := claim.Cluster
	if cluster == "" {
		cluster = p.cfg.ClusterID
	}
	w := p.clusters.watcher(cluster)
	if w == nil {
		return Proxy{}, refuse(refuseUnknownCluster, codes.Unauthenticated, "node %s: unknown cluster %q: this primary has no link to it", claim.ID, cluster)
	}
	id, viaCert, err := a.Authenticate(ctx, cluster)
	if err != nil {
		reason := refuseUnauthed
		if status.Code(err) == codes.Unavailable {
			reason = refuseUnavailable
		} else if status.Code(err) != codes.Unauthenticated {
			err = status.Error(codes.Unauthenticated, err.Error())
		}
		return Proxy{}, &refusal{reason: reason, err: err}
	}
	if id.TrustDomain != p.cfg.TrustDomain {
		return Proxy{}, refuse(refuseTrustDomain, codes.PermissionDenied, "node %s: identity %s is not of trust domain %s", claim.ID, id, p.cfg.TrustDomain)
	}
	if id.Namespace != claim.Namespace {
		return Proxy{}, refuse(refuseNamespace, codes.PermissionDenied, "node %s: claims namespace %q but authenticated as %s", claim.ID, claim.Namespace, id)
	}
	if claim.ServiceAccount != "" && claim.ServiceAccount != id.ServiceAccount {
		return Proxy{}, refuse(refuseServiceAccount, codes.PermissionDenied, "node %s: claims service account %q but authenticated as %s", claim.ID, claim.ServiceAccount, id)
	}
	if claim.Kind == ProxyGateway && id.Namespace != p.cfg.Namespace {
		return Proxy{}, refuse(refuseGateway, codes.PermissionDenied, "node %s: a router must run in %s, not as %s", claim.ID, p.cfg.Namespace, id)
	}
	if !w.hasSynced() {
		return Proxy{}, refuse(refuseUnavailable, codes.Unavailable, "node %s: cluster %s has not synced yet; retry", claim.ID, cluster)
	}
	// Only a certificate caller needs its pod (it proves the cluster); a token caller's
	// pod, when known, still has to match, but is not waited for.
	wait := time.Duration(0)
	if viaCert {
		wait = podWait
	}
	pod, err := w.lookupPod(ctx, claim.Namespace, claim.Pod, wait)
	if err != nil {
		return Proxy{}, refuse(refuseUnavailable, codes.Unavailable, "node %s: look up its pod in %s: %v", claim.ID, cluster, err)
	}
	if pod != nil && pod.Spec.ServiceAccountName != id.ServiceAccount {
		return Proxy{}, refuse(refuseServiceAccount, codes.PermissionDenied, "node %s: pod %s/%s in %s runs as %q, not as %s", claim.ID, pod.Namespace, pod.Name, cluster, pod.Spec.ServiceAccountName, id)
	}
	if viaCert && claim.Kind != ProxyGateway {
		if pod == nil {
			return Proxy{}, refuse(refusePod, codes.PermissionDenied, "node %s: a certificate names no cluster, and cluster %s has no pod %s/%s to vouch for it", claim.ID, cluster, claim.Namespace, claim.Pod)
		}
		if ip, err := netip.ParseAddr(pod.Status.PodIP); err == nil && ip != claim.IP {
			return Proxy{}, refuse(refusePod, codes.PermissionDenied, "node %s: pod %s/%s in %s is at %s, not %s", claim.ID, pod.Namespace, pod.Name, cluster, ip, claim.IP)
		}
	} else if viaCert {
		return Proxy{}, refuse(refusePod, codes.PermissionDenied, "node %s: a router must authenticate with a token (a certificate names no cluster)", claim.ID)
	}
	want := w.networkFor(claim.Namespace, claim.IP, pod)
	if claim.Network != want {
		return Proxy{}, refuse(refuseNetwork, codes.PermissionDenied, "node %s: claims network %q but its pod is on %q in cluster %s", claim.ID, claim.Network, want, cluster)
	}
	method := AuthToken
	if viaCert {
		method = AuthCertificate
	}
	return Proxy{ID: claim.ID, Kind: claim.Kind, Cluster: cluster, Network: want, Namespace: claim.Namespace,
		Identity: id.String(), Auth: method}, nil
}

// watcher returns the active watcher of cluster id, nil when there is none.
func (c *Clusters) watcher(id mesh.ClusterID) *clusterWatcher {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[id]; e != nil {
		return e.active
	}
	return nil
}

// hasSynced reports whether the watcher's caches are filled (its indexers are set then).
func (w *clusterWatcher) hasSynced() bool {
	select {
	case <-w.syncedCh:
		return true
	default:
		return false
	}
}

// lookupPod returns the pod from the cache, waiting up to wait for a pod created a
// moment ago to reach it, then asks the API server (a remote reader may not: it can only
// list and watch, so Forbidden counts as not found); nil when it does not exist. The
// watcher must have synced.
func (w *clusterWatcher) lookupPod(ctx context.Context, namespace, name string, wait time.Duration) (*corev1.Pod, error) {
	deadline := time.Now().Add(wait)
	for {
		if pod := getter[*corev1.Pod](w.pods)(namespace, name); pod != nil {
			return pod, nil
		}
		if time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	pod, err := w.client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsForbidden(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
	}
	return pod, nil
}

// podWait is how long a stream's authentication waits for its pod to reach the cache.
const podWait = 2 * time.Second

// networkFor is the network the primary assigns to a proxy of namespace at ip: its pod's
// label, its namespace's label, the CIDR map, then the cluster's network; the same order
// its endpoints get (translator.networkOf). The watcher must have synced.
func (w *clusterWatcher) networkFor(namespace string, ip netip.Addr, pod *corev1.Pod) mesh.NetworkID {
	if pod != nil {
		if a, err := netip.ParseAddr(pod.Status.PodIP); err == nil {
			ip = a
		}
	}
	var nsLabels map[string]string
	if ns := getter[*corev1.Namespace](w.ns)("", namespace); ns != nil {
		nsLabels = ns.Labels
	}
	tr := translator{defaultNetwork: w.defaultNetwork(), cidrs: w.cfg.CIDRs}
	return tr.networkOf(ip, pod, nsLabels)
}

// reasonOf returns the metric label of a refusal error.
func reasonOf(err error) string {
	var r *refusal
	if errors.As(err, &r) {
		return r.reason
	}
	return refuseBadNode
}
