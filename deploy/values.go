package deploy

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// Model is a deployment model of the mesh, as docs/deploy.md lists them.
type Model string

// The deployment models Render knows.
const (
	ModelSingleCluster        Model = "single-cluster"
	ModelMultiPrimary         Model = "multi-primary"
	ModelMultiNetwork         Model = "multi-network"
	ModelPrimaryRemote        Model = "primary-remote"
	ModelExternalControlPlane Model = "external-control-plane"
)

// Role is a cluster's part in a model.
type Role string

// The cluster roles. In the external-control-plane model RolePrimary is the cluster that
// hosts the control plane outside the mesh; it reads the config cluster (RoleConfig)
// through a credential.
const (
	RolePrimary Role = "primary"
	RoleRemote  Role = "remote"
	RoleConfig  Role = "config"
	RoleGateway Role = "gateway"
)

// modelRoles are the roles each model has; the order is the one errors list.
var modelRoles = map[Model][]Role{
	ModelSingleCluster:        {RolePrimary},
	ModelMultiPrimary:         {RolePrimary},
	ModelMultiNetwork:         {RolePrimary, RoleGateway},
	ModelPrimaryRemote:        {RolePrimary, RoleRemote, RoleGateway},
	ModelExternalControlPlane: {RolePrimary, RoleConfig, RoleRemote, RoleGateway},
}

// Models returns every model Render knows, sorted.
func Models() []Model {
	out := make([]Model, 0, len(modelRoles))
	for m := range modelRoles {
		out = append(out, m)
	}
	slices.Sort(out)
	return out
}

// Roles returns the roles of m (nil for an unknown model).
func Roles(m Model) []Role { return slices.Clone(modelRoles[m]) }

// multiNetwork reports whether m's clusters sit on separate networks joined by east-west
// gateways.
func (m Model) multiNetwork() bool {
	return m == ModelMultiNetwork || m == ModelPrimaryRemote || m == ModelExternalControlPlane
}

// Values is everything Render needs for one cluster. The YAML fields are what a values
// file holds (ParseValues); the files (CA, remote secrets, config credential) are read by
// the caller and handed in as data. The zero value of every optional field works and is
// documented with its default.
type Values struct {
	// Model and Role choose what is rendered; both required.
	Model Model `json:"model"`
	Role  Role  `json:"role"`
	// Name names the installation (label isthmus.io/install and the inventory);
	// default "isthmus". Two installations in one namespace need two names.
	Name string `json:"name,omitempty"`
	// ClusterID is this cluster's ID in the mesh; required.
	ClusterID string `json:"clusterID"`
	// Network is this cluster's network; required by the multi-network models, and
	// otherwise optional (it labels the namespace topology.istio.io/network).
	Network string `json:"network,omitempty"`
	// Namespace is the control-plane namespace; default istio-system.
	Namespace string `json:"namespace,omitempty"`
	// TrustDomain of workload identities; default cluster.local.
	TrustDomain string `json:"trustDomain,omitempty"`
	// Image is the isthmus image (isthmus image build); required.
	Image string `json:"image"`
	// ImagePullPolicy is the containers' pull policy; default IfNotPresent, which suits
	// an image loaded into the nodes (kind load) as well as one in a registry.
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy,omitempty"`
	// Primary configures the primary's Deployment.
	Primary PrimaryValues `json:"primary,omitempty"`
	// Gateway configures the east-west gateway.
	Gateway GatewayValues `json:"gateway,omitempty"`
	// Ingress configures the ingress gateway (`isthmus proxy --mode ingress`); off unless
	// enabled.
	Ingress IngressValues `json:"ingress,omitempty"`
	// ControlPlane says where this cluster's control plane is when it does not run here.
	ControlPlane ControlPlaneValues `json:"controlPlane,omitempty"`

	// CA holds the plug-in CA files by name (ca-cert.pem, ca-key.pem, root-cert.pem,
	// cert-chain.pem). The primary role needs all of them (Secret cacerts); the other
	// roles only root-cert.pem, for the ConfigMap istio-ca-root-cert.
	CA map[string][]byte `json:"-"`
	// RemoteSecrets are remote secrets (isthmus remote-secret create) to install in this
	// cluster's namespace: the primary role's remotes and peers, or a config cluster's.
	RemoteSecrets []*corev1.Secret `json:"-"`
	// ConfigCredential is the config cluster's credential (isthmus remote-secret create
	// --type config) that an external control plane reads its cluster through; required
	// by the primary role of external-control-plane and refused elsewhere.
	ConfigCredential *corev1.Secret `json:"-"`
}

// PrimaryValues configures the primary's Deployment.
type PrimaryValues struct {
	// Replicas of the primary; default 1. Every replica serves the same state (each
	// watches the clusters itself), so more replicas only add availability.
	Replicas int32 `json:"replicas,omitempty"`
	// LogLevel is debug, info, warn or error; default info.
	LogLevel string `json:"logLevel,omitempty"`
	// Gateways are NETWORK=IP:PORT gateways the primary uses besides those it discovers
	// (--gateway). A gateway Service is discovered at its load-balancer ingress or
	// external IPs; behind a NodePort it has neither, so name it here (a node's IP and
	// the node port).
	Gateways []string `json:"gateways,omitempty"`
}

// GatewayValues configures the east-west gateway.
type GatewayValues struct {
	// Enabled renders the gateway; default true in the multi-network models and for
	// the gateway role, and it must not be set true elsewhere (a single network needs
	// no gateway).
	Enabled *bool `json:"enabled,omitempty"`
	// ServiceType of the gateway's Service: LoadBalancer (default) where the cluster
	// has a load balancer, NodePort otherwise.
	ServiceType corev1.ServiceType `json:"serviceType,omitempty"`
	// NodePort fixes the node port of 15443 with ServiceType NodePort; default: the API
	// server allocates one.
	NodePort int32 `json:"nodePort,omitempty"`
	// ForwardControlPlane makes the gateway forward 15012 to the control plane, so that
	// remote clusters on other networks reach it; default true for the primary role of
	// primary-remote and the config role of external-control-plane.
	ForwardControlPlane *bool `json:"forwardControlPlane,omitempty"`
	// Replicas of the gateway; default 1.
	Replicas int32 `json:"replicas,omitempty"`
}

// IngressValues configures the ingress gateway: a Deployment of `isthmus proxy --mode
// ingress` labelled istio=ingressgateway (what Gateway selectors match) and its Service.
type IngressValues struct {
	// Enabled renders the ingress; default false. The primary and remote roles only, and
	// the cluster's network must be set (the ingress's node names it).
	Enabled bool `json:"enabled,omitempty"`
	// ServiceType of the ingress's Service: LoadBalancer (default) or NodePort.
	ServiceType corev1.ServiceType `json:"serviceType,omitempty"`
	// Ports are the Gateway server ports the Service exposes (each the same number in
	// the pod); default 80 and 443.
	Ports []int32 `json:"ports,omitempty"`
	// Replicas of the ingress; default 1.
	Replicas int32 `json:"replicas,omitempty"`
}

// ControlPlaneValues locates a control plane that runs elsewhere.
type ControlPlaneValues struct {
	// Cluster is the ID of the cluster whose control plane this one uses (the remote
	// role's topology.istio.io/controlPlaneClusters); required for remotes.
	Cluster string `json:"cluster,omitempty"`
	// Address is IP:PORT of the control plane's secure port as this cluster reaches it:
	// the primary network's gateway (remote, gateway roles) or the external control plane
	// (config role, whose gateway forwards to it). Required for the remote, config and
	// gateway roles.
	Address string `json:"address,omitempty"`
}

// ParseValues reads a values file: YAML or JSON, strictly (an unknown or misspelt field
// is an error naming it). It does not validate; Render does.
func ParseValues(data []byte) (Values, error) {
	var v Values
	if err := yaml.UnmarshalStrict(data, &v); err != nil {
		return Values{}, fmt.Errorf("deploy: values: %w", err)
	}
	return v, nil
}

// withDefaults returns v with every default filled in; v must have passed validate's
// model and role checks.
func (v Values) withDefaults() Values {
	if v.Name == "" {
		v.Name = "isthmus"
	}
	if v.Namespace == "" {
		v.Namespace = remote.DefaultNamespace
	}
	if v.TrustDomain == "" {
		v.TrustDomain = "cluster.local"
	}
	if v.ImagePullPolicy == "" {
		v.ImagePullPolicy = corev1.PullIfNotPresent
	}
	if v.Primary.Replicas == 0 {
		v.Primary.Replicas = 1
	}
	if v.Primary.LogLevel == "" {
		v.Primary.LogLevel = "info"
	}
	if v.Gateway.Enabled == nil {
		on := v.Model.multiNetwork() && !(v.Model == ModelExternalControlPlane && v.Role == RolePrimary)
		v.Gateway.Enabled = &on
	}
	if v.Gateway.ServiceType == "" {
		v.Gateway.ServiceType = corev1.ServiceTypeLoadBalancer
	}
	if v.Gateway.ForwardControlPlane == nil {
		on := (v.Model == ModelPrimaryRemote && v.Role == RolePrimary) || (v.Model == ModelExternalControlPlane && v.Role == RoleConfig)
		v.Gateway.ForwardControlPlane = &on
	}
	if v.Gateway.Replicas == 0 {
		v.Gateway.Replicas = 1
	}
	if v.Ingress.ServiceType == "" {
		v.Ingress.ServiceType = corev1.ServiceTypeLoadBalancer
	}
	if len(v.Ingress.Ports) == 0 {
		v.Ingress.Ports = []int32{80, 443}
	}
	if v.Ingress.Replicas == 0 {
		v.Ingress.Replicas = 1
	}
	return v
}

// validate returns every problem of v at once, each naming its field, so a values file
// is fixed in one round.
func (v Values) validate() error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	roles, ok := modelRoles[v.Model]
	switch {
	case v.Model == "":
		bad("model", "required (one of %s)", joinModels())
	case !ok:
		bad("model", "unknown model %q (one of %s)", v.Model, joinModels())
	case v.Role == "":
		bad("role", "required (model %s has roles %s)", v.Model, joinRoles(roles))
	case !slices.Contains(roles, v.Role):
		bad("role", "model %s has no role %q (its roles: %s)", v.Model, v.Role, joinRoles(roles))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	d := v.withDefaults()
	if _, err := mesh.ParseClusterID(v.ClusterID); err != nil {
		bad("clusterID", "%v", err)
	}
	if v.Network != "" {
		if _, err := mesh.ParseNetworkID(v.Network); err != nil {
			bad("network", "%v", err)
		}
	} else if v.Model.multiNetwork() && !(v.Model == ModelExternalControlPlane && v.Role == RolePrimary) {
		bad("network", "required by model %s (each cluster's network)", v.Model)
	}
	if msgs := validation.IsDNS1123Label(d.Namespace); len(msgs) > 0 {
		bad("namespace", "%q: %s", d.Namespace, strings.Join(msgs, "; "))
	}
	if msgs := validation.IsDNS1123Label(d.Name); len(msgs) > 0 || len(d.Name) > 40 {
		bad("name", "%q: want a DNS label of at most 40 characters", d.Name)
	}
	if _, err := mesh.ParseTrustDomain(d.TrustDomain); err != nil {
		bad("trustDomain", "%v", err)
	}
	if v.Image == "" {
		bad("image", "required (isthmus image build prints the tag it wrote)")
	} else if strings.ContainsAny(v.Image, " \t\n") {
		bad("image", "%q has white space", v.Image)
	}
	switch d.ImagePullPolicy {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		bad("imagePullPolicy", "%q: want Always, IfNotPresent or Never", d.ImagePullPolicy)
	}
	if d.Primary.Replicas < 0 {
		bad("primary.replicas", "%d is negative", d.Primary.Replicas)
	}
	switch d.Primary.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("primary.logLevel", "%q: want debug, info, warn or error", d.Primary.LogLevel)
	}
	for i, g := range v.Primary.Gateways {
		nw, ap, ok := strings.Cut(g, "=")
		if _, err := mesh.ParseNetworkID(nw); !ok || err != nil {
			bad(fmt.Sprintf("primary.gateways[%d]", i), "%q: want NETWORK=IP:PORT", g)
		} else if _, err := netip.ParseAddrPort(ap); err != nil {
			bad(fmt.Sprintf("primary.gateways[%d]", i), "%q: want NETWORK=IP:PORT (%v)", g, err)
		}
	}
	if len(v.Primary.Gateways) > 0 && (v.Role != RolePrimary || !v.Model.multiNetwork()) {
		bad("primary.gateways", "only a primary of a multi-network model uses gateways")
	}
	errs = append(errs, v.validateGateway(d)...)
	errs = append(errs, v.validateControlPlane(d)...)
	errs = append(errs, v.validateFiles(d)...)
	errs = append(errs, v.validateIngress(d)...)
	return errors.Join(errs...)
}

// validateIngress checks the ingress values (d has the defaults).
func (v Values) validateIngress(d Values) []error {
	if !v.Ingress.Enabled {
		return nil
	}
	var errs []error
	if v.Role != RolePrimary && v.Role != RoleRemote {
		errs = append(errs, fmt.Errorf("ingress.enabled: role %s runs no workloads; enable the ingress on a primary or remote cluster", v.Role))
	}
	if v.Network == "" {
		errs = append(errs, errors.New("ingress.enabled: needs network (the ingress's topology.istio.io/network)"))
	}
	switch d.Ingress.ServiceType {
	case corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeNodePort:
	default:
		errs = append(errs, fmt.Errorf("ingress.serviceType: %q: want LoadBalancer or NodePort", d.Ingress.ServiceType))
	}
	seen := map[int32]bool{}
	for i, p := range d.Ingress.Ports {
		if p < 1 || p > 65535 || p == PortGatewayAdmin || seen[p] {
			errs = append(errs, fmt.Errorf("ingress.ports[%d]: %d is not a free port number (1-65535, not %d, once)", i, p, PortGatewayAdmin))
		}
		seen[p] = true
	}
	if d.Ingress.Replicas < 0 {
		errs = append(errs, fmt.Errorf("ingress.replicas: %d is negative", d.Ingress.Replicas))
	}
	return errs
}

// validateGateway checks the gateway values (d has the defaults).
func (v Values) validateGateway(d Values) []error {
	var errs []error
	if *d.Gateway.Enabled && !v.Model.multiNetwork() {
		errs = append(errs, fmt.Errorf("gateway.enabled: model %s has one network and needs no east-west gateway", v.Model))
	}
	if !*d.Gateway.Enabled && v.Role == RoleGateway {
		errs = append(errs, errors.New("gateway.enabled: the gateway role renders only the gateway; it cannot be disabled"))
	}
	if *d.Gateway.Enabled && v.Model == ModelExternalControlPlane && v.Role == RolePrimary {
		errs = append(errs, errors.New("gateway.enabled: the external control plane's host cluster is not on a mesh network"))
	}
	switch d.Gateway.ServiceType {
	case corev1.ServiceTypeLoadBalancer, corev1.ServiceTypeNodePort:
	default:
		errs = append(errs, fmt.Errorf("gateway.serviceType: %q: want LoadBalancer or NodePort", d.Gateway.ServiceType))
	}
	if d.Gateway.NodePort != 0 && (d.Gateway.ServiceType != corev1.ServiceTypeNodePort || d.Gateway.NodePort < 1 || d.Gateway.NodePort > 65535) {
		errs = append(errs, fmt.Errorf("gateway.nodePort: %d needs serviceType NodePort and a port number", d.Gateway.NodePort))
	}
	if d.Gateway.Replicas < 0 {
		errs = append(errs, fmt.Errorf("gateway.replicas: %d is negative", d.Gateway.Replicas))
	}
	if *d.Gateway.ForwardControlPlane && !*d.Gateway.Enabled {
		errs = append(errs, errors.New("gateway.forwardControlPlane: needs the gateway"))
	}
	if *d.Gateway.ForwardControlPlane && v.Role != RolePrimary && v.ControlPlane.Address == "" {
		errs = append(errs, errors.New("gateway.forwardControlPlane: needs controlPlane.address, the control plane the gateway forwards to"))
	}
	return errs
}

// validateControlPlane checks controlPlane against the role.
func (v Values) validateControlPlane(d Values) []error {
	var errs []error
	needAddr := v.Role == RoleRemote || v.Role == RoleGateway || (v.Role == RoleConfig && *d.Gateway.Enabled)
	switch {
	case v.ControlPlane.Address == "" && needAddr:
		errs = append(errs, fmt.Errorf("controlPlane.address: required by role %s (IP:PORT of the control plane's secure port as this cluster reaches it)", v.Role))
	case v.ControlPlane.Address != "" && v.Role == RolePrimary:
		errs = append(errs, errors.New("controlPlane.address: the primary role runs the control plane itself"))
	case v.ControlPlane.Address != "":
		if _, err := netip.ParseAddrPort(v.ControlPlane.Address); err != nil {
			errs = append(errs, fmt.Errorf("controlPlane.address: %q: want IP:PORT (%v)", v.ControlPlane.Address, err))
		}
	}
	switch {
	case v.Role == RoleRemote && v.ControlPlane.Cluster == "":
		errs = append(errs, errors.New("controlPlane.cluster: required by role remote (the ID of the cluster whose control plane it uses)"))
	case v.ControlPlane.Cluster != "":
		if _, err := mesh.ParseClusterID(v.ControlPlane.Cluster); err != nil {
			errs = append(errs, fmt.Errorf("controlPlane.cluster: %v", err))
		}
	}
	return errs
}

// validateFiles checks the CA files, remote secrets and config credential the role needs.
func (v Values) validateFiles(d Values) []error {
	var errs []error
	external := v.Model == ModelExternalControlPlane && v.Role == RolePrimary
	if v.Role == RolePrimary {
		if _, err := trust.ParsePlugged(v.CA); err != nil {
			errs = append(errs, fmt.Errorf("ca: the primary needs the plug-in CA files (isthmus trust intermediate): %w", err))
		}
	} else if needsRoot(d) {
		if len(v.CA[trust.RootCertFile]) == 0 {
			errs = append(errs, fmt.Errorf("ca: role %s needs the mesh root (%s) for istio-ca-root-cert", v.Role, trust.RootCertFile))
		} else if _, err := parseRoots(v.CA[trust.RootCertFile]); err != nil {
			errs = append(errs, fmt.Errorf("ca: %s: %w", trust.RootCertFile, err))
		}
	}
	if len(v.RemoteSecrets) > 0 && v.Role != RolePrimary && v.Role != RoleConfig {
		errs = append(errs, fmt.Errorf("remoteSecrets: role %s holds none (the primary or config cluster does)", v.Role))
	}
	if len(v.RemoteSecrets) > 0 && external {
		errs = append(errs, errors.New("remoteSecrets: the external control plane reads them from the config cluster; install them there (role config)"))
	}
	seen := map[string]bool{}
	for i, s := range v.RemoteSecrets {
		creds, err := remote.ParseSecret(s, remote.Policy{})
		if err != nil {
			errs = append(errs, fmt.Errorf("remoteSecrets[%d] %s: %w", i, secretName(s), err))
			continue
		}
		if seen[s.Name] {
			errs = append(errs, fmt.Errorf("remoteSecrets[%d]: a second secret named %s", i, s.Name))
		}
		seen[s.Name] = true
		for _, c := range creds {
			if c.Err != nil {
				errs = append(errs, fmt.Errorf("remoteSecrets[%d] %s: cluster %q: %w", i, secretName(s), c.Key, c.Err))
			} else if string(c.Cluster) == v.ClusterID {
				errs = append(errs, fmt.Errorf("remoteSecrets[%d] %s: names this cluster (%s) itself", i, secretName(s), c.Cluster))
			}
		}
	}
	switch {
	case external && v.ConfigCredential == nil:
		errs = append(errs, errors.New("configCredential: the external control plane needs the config cluster's credential (isthmus remote-secret create --type config)"))
	case !external && v.ConfigCredential != nil:
		errs = append(errs, fmt.Errorf("configCredential: only the primary role of %s reads a config cluster", ModelExternalControlPlane))
	case external:
		if _, _, err := configKubeconfig(v.ConfigCredential); err != nil {
			errs = append(errs, fmt.Errorf("configCredential %s: %w", secretName(v.ConfigCredential), err))
		}
	}
	return errs
}

// needsRoot reports whether a non-primary role renders istio-ca-root-cert: for its
// gateway's xDS client, or for its workloads (remote, config).
func needsRoot(d Values) bool {
	return d.Role == RoleRemote || d.Role == RoleConfig || *d.Gateway.Enabled
}

// configKubeconfig returns the single cluster ID and kubeconfig of a config credential,
// checked with the strict kubeconfig policy.
func configKubeconfig(s *corev1.Secret) (string, []byte, error) {
	data := map[string][]byte{}
	for k, val := range s.Data {
		data[k] = val
	}
	for k, val := range s.StringData {
		data[k] = []byte(val)
	}
	if len(data) != 1 {
		return "", nil, fmt.Errorf("want exactly one entry (the config cluster's ID and kubeconfig), have %d", len(data))
	}
	for k, kc := range data {
		if _, err := mesh.ParseClusterID(k); err != nil {
			return "", nil, fmt.Errorf("entry %q: %w", k, err)
		}
		if _, err := remote.ParseKubeconfig(kc, remote.Policy{}); err != nil {
			return "", nil, fmt.Errorf("entry %q: %w", k, err)
		}
		return k, kc, nil
	}
	return "", nil, errors.New("unreachable")
}

// parseRoots checks that data is PEM holding at least one certificate, and only
// certificates.
func parseRoots(data []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("a PEM block of type %q, want only CERTIFICATE", b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return out, nil
}

func secretName(s *corev1.Secret) string {
	if s == nil {
		return "<nil>"
	}
	return fmt.Sprintf("%q", s.Name)
}

func joinModels() string {
	var s []string
	for _, m := range Models() {
		s = append(s, string(m))
	}
	return strings.Join(s, ", ")
}

func joinRoles(rs []Role) string {
	var s []string
	for _, r := range rs {
		s = append(s, string(r))
	}
	return strings.Join(s, ", ")
}
