package scenarios

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
	// Started is when Up began.
	Started time.Time

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
		Clients: map[string]*Component{}, Started: time.Now()}
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

	progress(fmt.Sprintf("trust: one root for %s, an intermediate per primary", t.Mesh.TrustDomain))
	td, _ := mesh.ParseTrustDomain(t.Mesh.TrustDomain)
	root, err := trust.NewRoot(td, trust.RootOptions{})
	if err != nil {
		return err
	}
	r.RootCert = filepath.Join(r.Dir, "trust", "root-cert.pem")
	if err := os.MkdirAll(filepath.Dir(r.RootCert), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(r.RootCert, root.RootPEM(), 0o644); err != nil {
		return err
	}
	caDirs := map[string]string{}
	for _, c := range t.Clusters {
		if c.ControlPlane.Role != RolePrimary {
			continue
		}
		inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: mesh.ClusterID(c.Name)})
		if err != nil {
			return err
		}
		caDirs[c.Name] = filepath.Join(r.Dir, "trust", c.Name)
		if err := inter.WriteDir(caDirs[c.Name]); err != nil {
			return err
		}
	}

	// Every primary watches every other cluster (primary clusters with endpoint
	// discovery), through a remote secret with the least-privilege reader.
	for _, pc := range clusters {
		if _, ok := caDirs[pc.Name]; !ok {
			continue
		}
		for _, other := range clusters {
			if other == pc {
				continue
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
			progress(fmt.Sprintf("starting the primary of %s (xDS, CA)", c.Name))
			comp, err := r.Env.StartPrimary(ctx, PrimarySpec{Cluster: c.Name, CADir: dir, TrustDomain: td})
			if err != nil {
				return err
			}
			r.Primaries[c.Name] = comp
		}
	}

	for _, n := range t.Networks {
		if !n.Gateway {
			continue
		}
		if err := r.startGateway(ctx, n.Name, progress); err != nil {
			return err
		}
	}

	return r.startWorkloads(ctx, progress)
}

// gatewayCluster is the cluster whose primary gives network's gateway its routes: the
// first primary cluster on the network.
func (r *Run) gatewayCluster(network string) *Cluster {
	for _, c := range r.Env.Clusters() {
		if string(c.Network) == network && r.Primaries[c.Name] != nil {
			return c
		}
	}
	return nil
}

// startGateway starts network's gateway and publishes it as a Service labelled with the
// network, which the primaries discover and use for split-horizon endpoints.
func (r *Run) startGateway(ctx context.Context, network string, progress func(string)) error {
	cl := r.gatewayCluster(network)
	if cl == nil {
		return fmt.Errorf("scenarios: network %s has a gateway but no cluster with a primary", network)
	}
	progress(fmt.Sprintf("starting the east-west gateway of %s (in %s)", network, cl.Name))
	comp, err := r.Env.StartGateway(ctx, GatewaySpec{Network: mesh.NetworkID(network), Cluster: cl.Name, XDS: r.Primaries[cl.Name].Addresses["xds"]})
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
		pc := r.Primaries[c.Name] // every cluster runs its own primary (remote clusters are not supported yet)
		index := 0
		base := PodSpec{Cluster: c.Name, XDS: pc.Addresses["xds"], CA: pc.Addresses["ca"], RootCert: r.RootCert}
		for _, w := range r.Topology.Workloads {
			for i := range w.Replicas[c.Name] {
				s := base
				s.Namespace, s.App, s.ServiceAccount, s.Port, s.Index = w.Namespace, w.Service, w.Service, w.Port, index
				s.Pod = fmt.Sprintf("%s-%s-%d", w.Service, c.Name, i+1)
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

// prepareCluster creates the system namespace (labelled with the cluster's network), the
// workloads' namespaces, service accounts and Services, and the clients' namespace.
func (r *Run) prepareCluster(ctx context.Context, c *Cluster) error {
	objs := []any{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: SystemNamespace, Labels: map[string]string{primary.LabelNetwork: string(c.Network)}}},
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ClientNamespace}},
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ClientServiceAccount, Namespace: ClientNamespace}},
	}
	for _, w := range r.Topology.Workloads {
		if _, listed := w.Replicas[c.Name]; !listed {
			continue
		}
		objs = append(objs,
			&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: w.Namespace}},
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: w.Service, Namespace: w.Namespace}},
			&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: w.Service, Namespace: w.Namespace},
				Spec: corev1.ServiceSpec{Selector: map[string]string{"app": w.Service},
					Ports: []corev1.ServicePort{{Name: "grpc", Port: int32(w.Port), TargetPort: intstr.FromString("grpc")}}}})
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
