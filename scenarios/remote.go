package scenarios

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Primary-remote: a remote cluster runs no control plane. As in Istio's remote profile its
// system namespace is annotated with the clusters whose control plane it uses, and a
// selector-less istiod Service with an EndpointSlice points at the primary network's
// east-west gateway, which forwards the control-plane port (15012: CSR API and secure xDS)
// to the primary. The remote's workloads and gateway dial that address from their own
// network; the primary authenticates them by TokenReview in the remote, through the
// remote secret it already holds.

// ControlPlanePort is the port of the secure xDS and CSR API, as Istio's 15012.
const ControlPlanePort = 15012

// AnnotationControlPlaneClusters names the clusters whose control plane a remote
// cluster's system namespace uses (Istio's topology.istio.io/controlPlaneClusters).
const AnnotationControlPlaneClusters = "topology.istio.io/controlPlaneClusters"

// checkRemote returns what is wrong with remote cluster c's control-plane spec.
func checkRemote(t *Topology, c ClusterSpec) []string {
	p, ok := t.Cluster(c.ControlPlane.Primary)
	switch {
	case c.ControlPlane.Primary == "":
		return []string{"a remote cluster names its primary (controlPlane.primary)"}
	case !ok:
		return []string{fmt.Sprintf("primary %q is not a cluster of this topology", c.ControlPlane.Primary)}
	case p.ControlPlane.Role != RolePrimary && p.ControlPlane.Role != RoleConfig:
		return []string{fmt.Sprintf("primary %q is not a primary (or config) cluster", c.ControlPlane.Primary)}
	}
	if p.Network != c.Network {
		for _, n := range t.Networks {
			if n.Name == p.Network && !n.Gateway {
				return []string{fmt.Sprintf("the remote reaches its primary through network %s's gateway, and that network has none", p.Network)}
			}
		}
	}
	return nil
}

// primaryOf returns the cluster whose primary serves cluster: itself, or a remote's primary.
func (r *Run) primaryOf(cluster string) string {
	c, _ := r.Topology.Cluster(cluster)
	if c.ControlPlane.Role == RoleRemote {
		return c.ControlPlane.Primary
	}
	return cluster
}

func ptrTo[T any](v T) *T { return &v }

// controlPlaneForward is the control-plane port network's gateway forwards: the address
// of the first primary on network that a remote cluster on another network uses, or "".
func (r *Run) controlPlaneForward(network string) string {
	for _, c := range r.Topology.Clusters {
		if c.ControlPlane.Role != RoleRemote {
			continue
		}
		p, _ := r.Topology.Cluster(c.ControlPlane.Primary)
		if pc := r.Primaries[p.Name]; p.Network == network && c.Network != network && pc != nil {
			if a := pc.Addresses["ca-gateway"]; a != "" {
				return a // the primary's listener for this gateway: its streams show as via it
			}
			return pc.Addresses["ca"]
		}
	}
	return ""
}

// ControlPlaneOf says where cluster's workloads get their xDS and certificates from.
func (r *Run) ControlPlaneOf(cluster string) string {
	if cp, ok := r.remotes[cluster]; ok {
		return fmt.Sprintf("primary of %s via istiod.%s.svc in %s → %s → gateway of %s", cp.Primary, SystemNamespace, cluster, cp.Address, cp.Via)
	}
	if p, ok := r.Primaries[cluster]; ok {
		if _, external := r.ExternalCredentials[cluster]; external {
			return fmt.Sprintf("external control plane of config cluster %s (its own process, config credential only), direct (%s)", cluster, p.Addresses["ca"])
		}
		return fmt.Sprintf("primary of %s, direct (%s)", cluster, p.Addresses["ca"])
	}
	return "none"
}

// remoteControlPlane is how a remote cluster reaches its primary.
type remoteControlPlane struct {
	// Address is the istiod endpoint in the remote cluster: the primary network's
	// gateway, port 15012.
	Address string
	// Via is the gateway's network; Primary the primary's cluster.
	Via, Primary string
}

// prepareRemote publishes the remote cluster's way to its primary, as Istio's remote
// profile does: the system namespace annotated with the primary's cluster, and a
// selector-less istiod Service whose EndpointSlice points at the primary network's
// gateway. It returns that address, read back from the remote's API.
func (r *Run) prepareRemote(ctx context.Context, c *Cluster) (remoteControlPlane, error) {
	spec, _ := r.Topology.Cluster(c.Name)
	p, _ := r.Topology.Cluster(spec.ControlPlane.Primary)
	gw := r.Gateways[p.Network]
	if gw == nil {
		return remoteControlPlane{}, fmt.Errorf("scenarios: remote %s: network %s of its primary has no gateway running", c.Name, p.Network)
	}
	ns, err := c.Client.CoreV1().Namespaces().Get(ctx, SystemNamespace, metav1.GetOptions{})
	if err != nil {
		return remoteControlPlane{}, err
	}
	if ns.Annotations == nil {
		ns.Annotations = map[string]string{}
	}
	ns.Annotations[AnnotationControlPlaneClusters] = p.Name
	if _, err := c.Client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		return remoteControlPlane{}, err
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "istiod", Namespace: SystemNamespace},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tls-istiod", Port: ControlPlanePort}}}}
	if err := apply(ctx, c.Client, svc); err != nil {
		return remoteControlPlane{}, err
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "istiod-remote", Namespace: SystemNamespace,
			Labels: map[string]string{discoveryv1.LabelServiceName: "istiod", discoveryv1.LabelManagedBy: "isthmus-scenarios"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{gw.Public.Addr().String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptrTo(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptrTo("tls-istiod"), Port: ptrTo(int32(ControlPlanePort))}},
	}
	es := c.Client.DiscoveryV1().EndpointSlices(SystemNamespace)
	if _, err := es.Create(ctx, slice, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		_, err = es.Update(ctx, slice, metav1.UpdateOptions{})
		if err != nil {
			return remoteControlPlane{}, err
		}
	} else if err != nil {
		return remoteControlPlane{}, err
	}
	// Read it back, as a remote's agent finds istiod.
	got, err := es.Get(ctx, "istiod-remote", metav1.GetOptions{})
	if err != nil {
		return remoteControlPlane{}, err
	}
	if len(got.Endpoints) == 0 || len(got.Endpoints[0].Addresses) == 0 || len(got.Ports) == 0 || got.Ports[0].Port == nil {
		return remoteControlPlane{}, errors.New("scenarios: the istiod EndpointSlice has no address")
	}
	addr := net.JoinHostPort(got.Endpoints[0].Addresses[0], fmt.Sprint(*got.Ports[0].Port))
	return remoteControlPlane{Address: addr, Via: p.Network, Primary: p.Name}, nil
}

// Relay accepts connections on l and joins each to a connection from dial, until ctx
// ends: a workload's local xDS relay, whose upstream connection is made from the pod's
// network (the only way a remote pod reaches its control plane).
func Relay(ctx context.Context, l net.Listener, dial func(context.Context) (net.Conn, error)) error {
	go func() { <-ctx.Done(); l.Close() }()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("scenarios: relay: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			up, err := dial(dctx)
			cancel()
			if err != nil {
				return
			}
			defer up.Close()
			done := make(chan struct{}, 2)
			cp := func(dst, src net.Conn) {
				io.Copy(dst, src)
				if tc, ok := dst.(interface{ CloseWrite() error }); ok {
					tc.CloseWrite()
				}
				done <- struct{}{}
			}
			go cp(up, c)
			go cp(c, up)
			select {
			case <-done:
				<-done
			case <-ctx.Done():
			}
		}()
	}
}
