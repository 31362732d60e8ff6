package scenarios

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// The probe client every cluster gets: the "client in every cluster" of the checks.
const (
	ClientNamespace      = "clients"
	ClientServiceAccount = "client"
)

// SystemNamespace holds remote secrets and gateway Services, as in Istio.
const SystemNamespace = "istio-system"

// Options configures Up.
type Options struct {
	// Dir is where the run keeps clusters, certificates and logs; required. It is left in
	// place after Close for the logs.
	Dir string
	// Progress receives one line per step; nil discards.
	Progress func(string)
}

// Run is a topology brought up: its environment and components.
type Run struct {
	Topology *Topology
	Env      Environment
	Dir      string
	// RootCert is the mesh root's file.
	RootCert string
	// Primaries, Gateways and Workloads by name; Clients by cluster.
	Primaries map[string]*Component // by cluster
	Gateways  map[string]*Component // by network
	Workloads []*Component
	Clients   map[string]*Component // by cluster
	// Ingress is the ingress gateway, once RunIngress started it; ingressCA is the file
	// of the CA its certificate chains to (what curl trusts).
	Ingress   *Component
	ingressCA string
	// Started is when Up began.
	Started time.Time
	// CADirs are the primaries' plug-in CA directories by cluster (a root rotation
	// rewrites them).
	CADirs map[string]string

	// caRelays stand for the path to each primary's CA when a fault cuts it (faultaction.go).
	caRelays map[string]*caRelay
	// remotes are the remote clusters' ways to their primaries, by cluster (remote.go).
	remotes map[string]remoteControlPlane
	// ExternalCredentials are the kubeconfig files external control planes run with, by
	// config cluster (external.go).
	ExternalCredentials map[string]string

	// rootCerts and rootFiles are the root file of each primary cluster and of each trust
	// domain (set by setupTrust).
	rootCerts, rootFiles map[string]string

	closeOnce sync.Once
}

// Up brings t up with p: clusters and networks, then namespaces, Services and service
// accounts, trust (a root, an intermediate per primary), remote secrets between primaries,
// the primaries, the gateways, and the workloads with a probe client per cluster. It
// returns once every component is ready; on error everything started is stopped.
func Up(ctx context.Context, t *Topology, p Provider, o Options) (*Run, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if o.Dir == "" {
		return nil, errors.New("scenarios: Options.Dir is required")
	}
	if o.Progress == nil {
		o.Progress = func(string) {}
	}
	r := &Run{Topology: t, Dir: o.Dir, Primaries: map[string]*Component{}, Gateways: map[string]*Component{},
		Clients: map[string]*Component{}, Started: time.Now(), remotes: map[string]remoteControlPlane{}, ExternalCredentials: map[string]string{}}
	env, err := p.Start(ctx, t, o.Dir, o.Progress)
	if err != nil {
		return nil, err
	}
	r.Env = env
	if err := r.up(ctx, o.Progress); err != nil {
		r.Close()
		return nil, err
	}
	o.Progress(fmt.Sprintf("scenario %s is up in %.1fs", t.Name, time.Since(r.Started).Seconds()))
	return r, nil
}

func (r *Run) up(ctx context.Context, progress func(string)) error {
	t := r.Topology
	clusters := r.Env.Clusters()

	progress("creating namespaces, service accounts and Services")
	for _, c := range clusters {
		if err := r.prepareCluster(ctx, c); err != nil {
			return fmt.Errorf("scenarios: cluster %s: %w", c.Name, err)
		}
	}

	caDirs, err := r.setupTrust(progress)
	if err != nil {
		return err
	}
	r.CADirs = caDirs

	// Every primary watches every other cluster (primary clusters with endpoint
	// discovery), through a remote secret with the least-privilege reader.
	for _, pc := range clusters {
		if _, ok := caDirs[pc.Name]; !ok {
			continue
		}
		for _, other := range clusters {
			if other == pc || !t.sameMesh(pc.Name, other.Name) {
				continue // meshes of a federation never hold each other's credentials
			}
			progress(fmt.Sprintf("linking %s → %s (remote secret, least-privilege reader)", pc.Name, other.Name))
			created, err := remote.Create(ctx, other.Client, other.REST, remote.CreateOptions{Cluster: mesh.ClusterID(other.Name)})
			if err != nil {
				return fmt.Errorf("scenarios: remote secret for %s: %w", other.Name, err)
			}
			if err := apply(ctx, pc.Client, created.Secret); err != nil {
				return fmt.Errorf("scenarios: apply remote secret for %s in %s: %w", other.Name, pc.Name, err)
			}
		}
	}

	for _, c := range t.Clusters {
		if dir, ok := caDirs[c.Name]; ok {
			spec := PrimarySpec{Cluster: c.Name, CADir: dir, TrustDomain: t.TrustDomainOf(c.Name),
				StaleWindow: t.Tuning.StaleWindow.Duration, ProbeInterval: t.Tuning.ProbeInterval.Duration}
			if c.Mesh != "" && t.FederationCluster(c.Mesh) == c.Name {
				spec.Mesh, spec.FederationDir = mesh.MeshID(c.Mesh), r.federationDir(c.Name)
				for _, n := range t.meshGateways(c.Mesh) {
					spec.FederationGateways = append(spec.FederationGateways, t.federationAddress(n).String())
				}
				progress(fmt.Sprintf("the primary of %s runs mesh %s's federation endpoint", c.Name, c.Mesh))
			} else if c.Mesh != "" {
				r.followFederation(&spec, c, progress)
			}
			if c.ControlPlane.Role == RoleConfig {
				progress(fmt.Sprintf("starting the external control plane of config cluster %s (its own process, config credential only)", c.Name))
				if spec.Kubeconfig, err = r.configCredential(ctx, c.Name); err != nil {
					return err
				}
			} else {
				progress(fmt.Sprintf("starting the primary of %s (xDS, CA)", c.Name))
			}
			comp, err := r.Env.StartPrimary(ctx, spec)
			if err != nil {
				return err
			}
			r.Primaries[c.Name] = comp
		}
	}

	if err := r.federateAll(ctx, progress); err != nil {
		return err
	}

	// Gateways of networks with a primary first: remote clusters reach their primary
	// through them, and remote networks' gateways get their routes that way.
	for _, primaries := range []bool{true, false} {
		for _, n := range t.Networks {
			if cl := r.gatewayCluster(n.Name); !n.Gateway || cl == nil || (r.Primaries[cl.Name] != nil) != primaries {
				continue
			}
			if err := r.startGateway(ctx, n.Name, progress); err != nil {
				return err
			}
		}
		if !primaries {
			break
		}
		for _, c := range clusters {
			if spec, _ := t.Cluster(c.Name); spec.ControlPlane.Role == RoleRemote {
				progress(fmt.Sprintf("remote %s: istiod Service and EndpointSlice → the gateway of its primary's network; namespace annotated", c.Name))
				cp, err := r.prepareRemote(ctx, c)
				if err != nil {
					return err
				}
				r.remotes[c.Name] = cp
			}
		}
	}

	if err := r.startWorkloads(ctx, progress); err != nil {
		return err
	}
	// Peerings last: the peers' bundles reach running workloads through their bundle
	// stores, as they do for a mesh that peers long after its pods started.
	return r.federateMeshes(ctx, progress)
}

// gatewayCluster is the cluster whose primary gives network's gateway its routes: the
// first primary cluster on the network.
func (r *Run) gatewayCluster(network string) *Cluster {
	for _, c := range r.Env.Clusters() {
		if string(c.Network) == network && r.Primaries[c.Name] != nil {
			return c
		}
	}
	for _, c := range r.Env.Clusters() { // a network of remote clusters only
		if string(c.Network) == network {
			return c
		}
	}
	return nil
}

// anchorsFileOf is a file that holds, at every moment, the roots the CA of cluster's
// primary trusts: its plug-in CA directory's root-cert.pem, which a root rotation
// rewrites (as Istio's istio-ca-root-cert ConfigMap follows its CA). Gateways verify their
// primary against it, and re-read it when they reconnect. Without a CA directory it is
// the file of the root the cluster's CA chains to.
func (r *Run) anchorsFileOf(cluster string) string {
	if dir, ok := r.CADirs[cluster]; ok {
		f := filepath.Join(dir, trust.RootCertFile)
		if _, err := os.Stat(f); err == nil {
			return f
		}
	}
	return r.RootCertOf(cluster)
}

// startGateway starts network's gateway and publishes it as a Service labelled with the
// network, which the primaries discover and use for split-horizon endpoints.
func (r *Run) startGateway(ctx context.Context, network string, progress func(string)) error {
	cl := r.gatewayCluster(network)
	if cl == nil {
		return fmt.Errorf("scenarios: network %s has a gateway but no cluster with a primary", network)
	}
	progress(fmt.Sprintf("starting the east-west gateway of %s (in %s)", network, cl.Name))
	spec := GatewaySpec{Network: mesh.NetworkID(network), Cluster: cl.Name, RootCert: r.anchorsFileOf(r.primaryOf(cl.Name)), ControlPlane: r.controlPlaneForward(network)}
	if len(r.Topology.Meshes) > 0 {
		spec.Federation = r.Topology.federationAddress(network)
	}
	if pc := r.Primaries[cl.Name]; pc != nil {
		spec.XDS = pc.Addresses["xds"]
	} else if cp, ok := r.remotes[cl.Name]; ok {
		spec.XDS, spec.XDSFromNetwork = cp.Address, true
	} else {
		return fmt.Errorf("scenarios: network %s: cluster %s has neither a primary nor a way to one", network, cl.Name)
	}
	comp, err := r.Env.StartGateway(ctx, spec)
	if err != nil {
		return err
	}
	r.Gateways[network] = comp
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "eastwestgateway", Namespace: SystemNamespace, Labels: map[string]string{primary.LabelNetwork: network}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tls", Port: int32(comp.Public.Port())}},
			ExternalIPs: []string{comp.Public.Addr().String()}},
	}
	return apply(ctx, cl.Client, svc)
}

// StopGateway stops network's gateway, as a fault: its network becomes unreachable from
// the others. RestartGateway brings a new one.
func (r *Run) StopGateway(network string) error {
	comp, ok := r.Gateways[network]
	if !ok {
		return fmt.Errorf("scenarios: network %s has no gateway", network)
	}
	return comp.Stop()
}

// RestartGateway starts network's gateway again after StopGateway.
func (r *Run) RestartGateway(ctx context.Context, network string) error {
	return r.startGateway(ctx, network, func(string) {})
}

func (r *Run) startWorkloads(ctx context.Context, progress func(string)) error {
	type job struct {
		spec PodSpec
		kind string
	}
	var jobs []job
	for _, c := range r.Topology.Clusters {
		index := 0
		base := PodSpec{Cluster: c.Name, RootCert: r.RootCertOf(r.primaryOf(c.Name)), CertTTL: r.Topology.Tuning.CertTTL.Duration,
			Locality: mesh.Locality{Region: c.Region, Zone: c.Zone}}
		if cp, ok := r.remotes[c.Name]; ok { // a remote: its primary through a gateway
			base.XDS, base.CA, base.ControlPlaneFromNetwork = cp.Address, cp.Address, true
		} else if pc := r.Primaries[c.Name]; pc != nil {
			ca, err := r.caAddress(c.Name, pc.Addresses["ca"])
			if err != nil {
				return err
			}
			base.XDS, base.CA = pc.Addresses["xds"], ca
		} else {
			return fmt.Errorf("scenarios: cluster %s has no control plane to use", c.Name)
		}
		for _, w := range r.Topology.Workloads {
			for i := range w.Replicas[c.Name] {
				s := base
				s.Namespace, s.App, s.ServiceAccount, s.Port, s.Index = w.Namespace, w.Service, w.Service, w.Port, index
				s.XDSServer, s.HTTPPort = w.XDSServer, w.HTTPPort
				s.Pod = fmt.Sprintf("%s-%s-%d", w.Service, c.Name, i+1)
				s.Labels = w.Labels[c.Name]
				jobs = append(jobs, job{s, "workload"})
				index++
			}
		}
		s := base
		s.Namespace, s.App, s.ServiceAccount, s.Port, s.Index = ClientNamespace, "client", ClientServiceAccount, 8080, index
		s.Pod = "client-" + c.Name
		jobs = append(jobs, job{s, "client"})
	}
	progress(fmt.Sprintf("starting %d workload pod(s), a probe client per cluster among them; each gets its certificate from its cluster's CA", len(jobs)))
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		errs []error
	)
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			comp, err := r.Env.StartWorkload(ctx, j.spec)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			if j.kind == "client" {
				r.Clients[j.spec.Cluster] = comp
			} else {
				r.Workloads = append(r.Workloads, comp)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// caAddress is where cluster's workloads reach their CA at ca: ca itself, or a relay when
// a fault of the topology cuts that path.
func (r *Run) caAddress(cluster, ca string) (string, error) {
	for _, f := range r.Topology.Faults {
		if f.Kind == FaultCAUnreachable && f.Target == cluster {
			relay, err := newCARelay(ca)
			if err != nil {
				return "", err
			}
			if r.caRelays == nil {
				r.caRelays = map[string]*caRelay{}
			}
			r.caRelays[cluster] = relay
			return relay.addr(), nil
		}
	}
	return ca, nil
}

// prepareCluster creates the system namespace (labelled with the cluster's network), the
// workloads' namespaces, service accounts and Services, and the clients' namespace.
func (r *Run) prepareCluster(ctx context.Context, c *Cluster) error {
	objs := []any{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: SystemNamespace, Labels: map[string]string{primary.LabelNetwork: string(c.Network)}}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ClientNamespace}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ClientServiceAccount, Namespace: ClientNamespace}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: GatewayServiceAccount, Namespace: SystemNamespace}},
	}
	for _, w := range r.Topology.Workloads {
		_, listed := w.Replicas[c.Name]
		spec, _ := r.Topology.Cluster(c.Name)
		exported := slices.ContainsFunc(r.Topology.Exports, func(e ExportSpec) bool {
			return e.Service == w.Service+"."+w.Namespace && r.Topology.FederationCluster(e.Mesh) == c.Name && spec.Mesh == e.Mesh
		})
		if !listed && !exported { // an exported Service exists where its ServiceExport is
			continue
		}
		ports := []corev1.ServicePort{{Name: "grpc", Port: int32(w.Port), TargetPort: intstr.FromString("grpc")}}
		if w.HTTPPort > 0 {
			ports = append(ports, corev1.ServicePort{Name: "http", Port: int32(w.HTTPPort), TargetPort: intstr.FromString("http")})
		}
		objs = append(objs,
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: w.Namespace}},
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: w.Service, Namespace: w.Namespace}},
			&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: w.Service, Namespace: w.Namespace},
				Spec: corev1.ServiceSpec{Selector: map[string]string{"app": w.Service}, Ports: ports}})
	}
	for _, o := range objs {
		if err := apply(ctx, c.Client, o); err != nil {
			return err
		}
	}
	return nil
}

// apply creates obj, or leaves an existing one as it is (a namespace two workloads share).
// Secrets and Services are replaced so that a restarted component's new address counts.
func apply(ctx context.Context, c kubernetes.Interface, obj any) error {
	var err error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = c.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
	case *corev1.ServiceAccount:
		_, err = c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *corev1.Service:
		_, err = c.CoreV1().Services(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			var cur *corev1.Service
			if cur, err = c.CoreV1().Services(o.Namespace).Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				cur.Spec.ExternalIPs, cur.Labels = o.Spec.ExternalIPs, o.Labels
				_, err = c.CoreV1().Services(o.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
			}
		}
	case *corev1.Secret:
		_, err = c.CoreV1().Secrets(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			_, err = c.CoreV1().Secrets(o.Namespace).Update(ctx, o, metav1.UpdateOptions{})
		}
	default:
		return fmt.Errorf("scenarios: apply: unsupported %T", obj)
	}
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// Close tears the run down: components, clusters, networks. Safe to call more than once.
func (r *Run) Close() error {
	var err error
	r.closeOnce.Do(func() {
		if r.Env != nil {
			err = r.Env.Close()
		}
		for _, c := range r.caRelays {
			c.close()
		}
	})
	return err
}

// Identity returns the SPIFFE ID of a service account in the mesh.
func (r *Run) Identity(namespace, serviceAccount string) string {
	return "spiffe://" + r.Topology.Mesh.TrustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// ServicePort returns the port of "<name>.<namespace>".
func (t *Topology) ServicePort(service string) int {
	for _, w := range t.Workloads {
		if w.Service+"."+w.Namespace == service {
			return w.Port
		}
	}
	return 0
}
