package scenarios

import (
	"context"
	"net/netip"
	"time"

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
	// StartIngress runs an ingress gateway (`isthmus proxy --mode ingress`) on a
	// cluster's network; its Public address is what clients outside every mesh network
	// reach, and it is ready once every listener its Gateways configure is open.
	StartIngress(ctx context.Context, spec IngressProxySpec) (*Component, error)
	// ExternalCommand returns the command prefix that runs a program outside every mesh
	// network, where only the ingresses' Public addresses are reachable (nil when
	// networks are not separated).
	ExternalCommand() []string
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
	// Kubeconfig, when set, is the primary's credential for its cluster instead of the
	// cluster's admin kubeconfig (an external control plane's config credential).
	Kubeconfig string
	// TrustDomain of the mesh.
	TrustDomain mesh.TrustDomain
	// StaleWindow and ProbeInterval tune link health; zero means the provider's default.
	StaleWindow, ProbeInterval time.Duration
	// Mesh, when set, runs the mesh's federation endpoint beside the primary
	// (docs/federation.md), keeping its state and admin socket in FederationDir;
	// FederationGateways are the mesh's gateways' federation listeners, which peers
	// reach exported services through.
	Mesh               mesh.MeshID
	FederationDir      string
	FederationGateways []string
	// FederationFollow, when set, is the federation endpoint (HOST:PORT) of the mesh's
	// federation cluster that this primary, another of the mesh, follows (`isthmus
	// primary --federation-follow`): its imports and peers' bundles reach this cluster too.
	FederationFollow string
}

// GatewaySpec asks for a network's east-west gateway.
type GatewaySpec struct {
	// Network is the gateway's network; Cluster is the cluster it runs in and whose
	// primary (XDS) gives it routes.
	Network mesh.NetworkID
	Cluster string
	XDS     string
	// RootCert verifies the primary's secure xDS port; the gateway authenticates with the
	// token of GatewayServiceAccount in its cluster.
	RootCert string
	// XDSFromNetwork, when set, makes the gateway dial XDS from inside its network (a
	// remote cluster's gateway, whose primary is reached through another gateway).
	XDSFromNetwork bool
	// ControlPlane, when set, is a primary's control-plane address the gateway forwards
	// its public ControlPlanePort to (for remote clusters on other networks).
	ControlPlane string
	// Federation, when valid, is where the gateway serves peer meshes (`isthmus gateway
	// --federation-listen`): only exported services, under their federation names.
	Federation netip.AddrPort
}

// IngressProxySpec asks for an ingress gateway.
type IngressProxySpec struct {
	// Cluster is the cluster the ingress runs in, on the cluster's network; XDS is its
	// primary's secure xDS (and CA) address, RootCert the file that verifies it.
	Cluster  string
	XDS      string
	RootCert string
	// Name is the ingress pod's name; it authenticates with the token of
	// IngressServiceAccount in SystemNamespace and carries the pod label
	// istio=ingressgateway, which Gateway selectors match.
	Name string
}

// IngressServiceAccount is the identity of ingress gateways, in SystemNamespace (Istio's
// name for it): their token at the primary, and their mesh certificate's SPIFFE ID.
const IngressServiceAccount = "istio-ingressgateway-service-account"

// GatewayServiceAccount is the identity east-west gateways authenticate to the primary
// with, in SystemNamespace (Istio's name for it).
const GatewayServiceAccount = "istio-eastwestgateway"

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
	// CertTTL is the validity the pod asks for; zero means the workload's default.
	CertTTL time.Duration
	// ControlPlaneFromNetwork makes the pod dial XDS and CA from inside its network: a
	// remote cluster's pod, whose primary is reached through a gateway.
	ControlPlaneFromNetwork bool
	// XDSServer serves through grpc-go's xds.NewGRPCServer (WorkloadSpec.XDSServer).
	XDSServer bool
	// Labels are extra Pod labels (WorkloadSpec.Labels of its cluster).
	Labels map[string]string
	// HTTPPort also serves HTTP on the pod's address (WorkloadSpec.HTTPPort); 0: none.
	HTTPPort int
	// Locality is the pod's, for its xDS node (its cluster's region and zone).
	Locality mesh.Locality
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
