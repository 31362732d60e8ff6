package scenarios

import (
	"context"
	"net/netip"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Provider makes the clusters and networks of a topology. The runner does everything else
// through the Environment it returns and the clusters' Kubernetes APIs, so a provider
// knows nothing of meshes: the local provider runs processes, a kind provider would run
// Deployments.
type Provider interface {
	// Name identifies the provider in reports ("local").
	Name() string
	// Start creates t's clusters and networks under dir and returns when every cluster's
	// API server is ready. progress receives one line per step. On error nothing is left
	// running.
	Start(ctx context.Context, t *Topology, dir string, progress func(string)) (Environment, error)
}

// Environment is a started topology: its clusters, and the places to run components.
// Every Start* method returns once the component is ready (or has failed).
type Environment interface {
	// Clusters returns the clusters in the topology's order.
	Clusters() []*Cluster
	// StartPrimary runs a control plane in a cluster.
	StartPrimary(ctx context.Context, spec PrimarySpec) (*Component, error)
	// StartGateway runs a network's east-west gateway.
	StartGateway(ctx context.Context, spec GatewaySpec) (*Component, error)
	// StartWorkload runs one pod of a workload (or a cluster's probe client).
	StartWorkload(ctx context.Context, spec PodSpec) (*Component, error)
	// NetworkCommand returns the command prefix that runs a program on a network (for
	// the "how to explore" help), or nil when networks are not separated.
	NetworkCommand(network string) []string
	// Close stops every component, then the clusters and networks. It is safe to call
	// more than once.
	Close() error
}

// Cluster is one started cluster.
type Cluster struct {
	Name       string
	Network    mesh.NetworkID
	Kubeconfig string // path of an admin kubeconfig
	APIServer  string // URL
	REST       *rest.Config
	Client     kubernetes.Interface
}

// PrimarySpec asks for a control plane.
type PrimarySpec struct {
	// Cluster runs the primary.
	Cluster string
	// CADir is the plug-in CA directory the primary signs with.
	CADir string
	// TrustDomain of the mesh.
	TrustDomain mesh.TrustDomain
}

// GatewaySpec asks for a network's east-west gateway.
type GatewaySpec struct {
	// Network is the gateway's network; Cluster is the cluster it runs in and whose
	// primary (XDS) gives it routes.
	Network mesh.NetworkID
	Cluster string
	XDS     string
}

// PodSpec asks for one workload pod.
type PodSpec struct {
	Cluster        string
	Namespace      string
	App            string // the app label its Service selects
	Pod            string
	ServiceAccount string
	Port           int
	// Index numbers the pods of a cluster from 0; the local provider derives the pod's
	// address from it.
	Index int
	// XDS and CA are the addresses of the cluster's primary; RootCert is the file of the
	// root that signed the CA's serving certificate.
	XDS, CA, RootCert string
}

// Component is a started primary, gateway or workload.
type Component struct {
	// Kind is "primary", "gateway" or "workload"; Name names it in reports.
	Kind, Name string
	Cluster    string
	Network    mesh.NetworkID
	// Addresses by purpose: "xds", "ca", "http" (primary); "listen", "http" (gateway);
	// "pod", "admin" (workload).
	Addresses map[string]string
	// Public is where other networks reach a gateway.
	Public netip.AddrPort
	// Log is where the component's output goes, if it has a file.
	Log string
	// PID is the component's process, when it is one.
	PID int

	stop func() error
}

// Stop stops the component and waits for it to end.
func (c *Component) Stop() error {
	if c.stop == nil {
		return nil
	}
	return c.stop()
}
