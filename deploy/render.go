package deploy

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"sync"

	"istio.io/api/label"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// Names of what Render makes. The Service is called istiod because Istio's agents,
// grpc-go bootstraps and the gateway dial istiod.<namespace>.svc:15012 and the primary's
// serving certificate carries that name (trust.ServingNames).
const (
	PrimaryName           = "isthmus-primary"
	PrimaryServiceName    = "istiod"
	GatewayName           = "istio-eastwestgateway"
	IngressName           = "istio-ingressgateway"
	IngressAccount        = "istio-ingressgateway-service-account"
	RootCertConfigMap     = "istio-ca-root-cert"
	ConfigCredentialName  = "isthmus-config-cluster"
	LabelInstall          = "isthmus.io/install"
	LabelManagedBy        = "app.kubernetes.io/managed-by"
	ManagedBy             = "isthmus"
	AnnotationControlPlan = "topology.istio.io/controlPlaneClusters"
)

// Ports the binary listens on (cmd/isthmus primary and gateway defaults).
const (
	PortControlPlane = 15012 // secure xDS and the CSR API
	PortMonitoring   = 15014 // primary: /readyz, /metrics, /debug
	PortMTLS         = 15443 // gateway: cross-network mTLS, SNI passthrough
	PortGatewayAdmin = 15021 // gateway: /readyz, /metrics
)

// Render returns the objects cluster v.ClusterID needs for its role in v.Model, sorted in
// the order they can be applied (namespaces and CRDs first, workloads last). It is pure:
// the same values give the same objects, byte for byte once marshalled. An invalid
// value is refused with every problem named; nothing is rendered then.
func Render(v Values) ([]*unstructured.Unstructured, error) {
	if err := v.validate(); err != nil {
		return nil, fmt.Errorf("deploy: values: %w", err)
	}
	v = v.withDefaults()
	r := &renderer{v: v}
	r.namespace()
	switch v.Role {
	case RolePrimary:
		r.primary()
	case RoleRemote:
		r.reader(false)
		r.remoteControlPlane()
		r.rootCert()
	case RoleConfig:
		r.reader(true)
		r.crds()
		r.rootCert()
	}
	if *v.Gateway.Enabled {
		r.gateway()
	}
	if v.Ingress.Enabled {
		r.ingress()
	}
	r.remoteSecrets()
	if r.err != nil {
		return nil, fmt.Errorf("deploy: render: %w", r.err)
	}
	sortObjects(r.out)
	return r.out, nil
}

// renderer accumulates objects; the first conversion error sticks.
type renderer struct {
	v   Values
	out []*unstructured.Unstructured
	err error
}

// labels are the labels every rendered object carries, plus extra.
func (r *renderer) labels(extra map[string]string) map[string]string {
	l := map[string]string{LabelManagedBy: ManagedBy, LabelInstall: r.v.Name, "app.kubernetes.io/part-of": "isthmus"}
	maps.Copy(l, extra)
	return l
}

func (r *renderer) meta(name string, namespaced bool, extra map[string]string) metav1.ObjectMeta {
	m := metav1.ObjectMeta{Name: name, Labels: r.labels(extra)}
	if namespaced {
		m.Namespace = r.v.Namespace
	}
	return m
}

// add converts obj (a typed object with TypeMeta set) and appends it.
func (r *renderer) add(obj runtime.Object) {
	if r.err != nil {
		return
	}
	u, err := toUnstructured(obj)
	if err != nil {
		r.err = err
		return
	}
	r.out = append(r.out, u)
}

func (r *renderer) namespace() {
	extra := map[string]string{}
	if r.v.Network != "" {
		extra[label.TopologyNetwork.Name] = r.v.Network
	}
	ns := &corev1.Namespace{TypeMeta: typeMeta("v1", "Namespace"), ObjectMeta: r.meta(r.v.Namespace, false, extra)}
	if r.v.Role == RoleRemote {
		ns.Annotations = map[string]string{AnnotationControlPlan: r.v.ControlPlane.Cluster}
	}
	r.add(ns)
}

// primary renders the control plane: its identity and rights, the plug-in CA, the
// Deployment and the Service, and what the model asks of a primary's cluster besides.
func (r *renderer) primary() {
	v := r.v
	external := v.Model == ModelExternalControlPlane
	r.add(&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: r.meta(PrimaryName, true, nil),
		AutomountServiceAccountToken: ptr(!external)})
	if !external {
		// In its own cluster the primary reads what a remote reader may, the Istio
		// config, single pods (a stream's pod before the cache has it) and records
		// Events on refused config; in its namespace it reads the remote secrets and keeps
		// the trust ConfigMaps (bundle store, federation relationships).
		rules := append(remote.ReaderRules(), remote.ConfigRules()...)
		rules = append(rules,
			rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}},
			rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"events"}, Verbs: []string{"create"}})
		r.clusterRole(PrimaryName, PrimaryName, rules)
		r.role(PrimaryName, PrimaryName, append(remote.ConfigNamespaceRules(),
			rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"get", "list", "watch", "create", "update"}}))
		r.crds()
		if v.Model == ModelMultiPrimary || v.Model == ModelMultiNetwork {
			r.reader(false) // the other primaries discover this cluster
		}
	}
	// The plug-in CA exactly as trust wrote it (validated with trust.ParsePlugged).
	files := map[string][]byte{}
	for _, name := range []string{trust.CACertFile, trust.CAKeyFile, trust.RootCertFile, trust.CertChainFile} {
		if data, ok := v.CA[name]; ok {
			files[name] = data
		}
	}
	r.add(&corev1.Secret{TypeMeta: typeMeta("v1", "Secret"), ObjectMeta: r.meta(trust.SecretName, true, nil), Type: corev1.SecretTypeOpaque, Data: files})

	clusterID := v.ClusterID
	args := []string{"primary", "--namespace", v.Namespace, "--ca-dir", "/etc/cacerts", "--trust-domain", v.TrustDomain,
		"--ca-address", ":" + strconv.Itoa(PortControlPlane), "--http-address", ":" + strconv.Itoa(PortMonitoring), "--log-level", v.Primary.LogLevel}
	mounts := []corev1.VolumeMount{{Name: "cacerts", MountPath: "/etc/cacerts", ReadOnly: true}}
	volumes := []corev1.Volume{{Name: "cacerts", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: trust.SecretName}}}}
	if external {
		// The external control plane's "own" cluster is the config cluster, read through
		// the config credential mounted from this Secret.
		key, kubeconfig, _ := configKubeconfig(v.ConfigCredential)
		clusterID = key
		r.add(&corev1.Secret{TypeMeta: typeMeta("v1", "Secret"), ObjectMeta: r.meta(ConfigCredentialName, true, nil),
			Type: corev1.SecretTypeOpaque, Data: map[string][]byte{"kubeconfig": kubeconfig}})
		args = append(args, "--kubeconfig", "/etc/isthmus/config/kubeconfig")
		mounts = append(mounts, corev1.VolumeMount{Name: "config-cluster", MountPath: "/etc/isthmus/config", ReadOnly: true})
		volumes = append(volumes, corev1.Volume{Name: "config-cluster", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: ConfigCredentialName}}})
	}
	args = append(args, "--cluster-id", clusterID)
	if v.Network != "" {
		args = append(args, "--network", v.Network)
	}
	for _, g := range v.Primary.Gateways {
		args = append(args, "--gateway", g)
	}
	selector := map[string]string{"app": PrimaryName}
	ports := []corev1.ContainerPort{
		{Name: "grpc-xds-tls", ContainerPort: PortControlPlane, Protocol: corev1.ProtocolTCP},
		{Name: "http-monitoring", ContainerPort: PortMonitoring, Protocol: corev1.ProtocolTCP},
	}
	r.add(r.deployment(PrimaryName, selector, v.Primary.Replicas, corev1.Container{
		Name: "primary", Args: args, Ports: ports, VolumeMounts: mounts,
		ReadinessProbe: httpProbe(PortMonitoring),
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: mustQuantity("100m"), corev1.ResourceMemory: mustQuantity("128Mi")}},
	}, volumes, nil))
	r.add(&corev1.Service{TypeMeta: typeMeta("v1", "Service"), ObjectMeta: r.meta(PrimaryServiceName, true, selector),
		Spec: corev1.ServiceSpec{Selector: selector, Ports: []corev1.ServicePort{
			{Name: "grpc-xds-tls", Port: PortControlPlane, TargetPort: intstr.FromInt32(PortControlPlane), Protocol: corev1.ProtocolTCP},
			{Name: "http-monitoring", Port: PortMonitoring, TargetPort: intstr.FromInt32(PortMonitoring), Protocol: corev1.ProtocolTCP},
		}}})
}

// reader renders the least-privilege reader other control planes use through a remote
// secret, under the names `isthmus remote-secret create` uses, so that it only has to
// request the token. config adds the config cluster's rights.
func (r *renderer) reader(config bool) {
	sa := remote.DefaultServiceAccount
	name := sa + "-" + r.v.Namespace
	r.add(&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: r.meta(sa, true, nil), AutomountServiceAccountToken: ptr(false)})
	r.clusterRole(name, sa, remote.ReaderRules())
	if config {
		r.clusterRole(name+"-config", sa, remote.ConfigRules())
		r.role(name+"-config", sa, remote.ConfigNamespaceRules())
	}
}

// clusterRole renders a ClusterRole and its binding to service account sa.
func (r *renderer) clusterRole(name, sa string, rules []rbacv1.PolicyRule) {
	r.add(&rbacv1.ClusterRole{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRole"), ObjectMeta: r.meta(name, false, nil), Rules: rules})
	r.add(&rbacv1.ClusterRoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"), ObjectMeta: r.meta(name, false, nil),
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: r.v.Namespace}}})
}

// role renders a Role in the namespace and its binding to service account sa.
func (r *renderer) role(name, sa string, rules []rbacv1.PolicyRule) {
	r.add(&rbacv1.Role{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "Role"), ObjectMeta: r.meta(name, true, nil), Rules: rules})
	r.add(&rbacv1.RoleBinding{TypeMeta: typeMeta("rbac.authorization.k8s.io/v1", "RoleBinding"), ObjectMeta: r.meta(name, true, nil),
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: r.v.Namespace}}})
}

// Istio's CRDs, decoded once (half a megabyte of YAML); crds copies them.
var (
	crdOnce sync.Once
	crdDefs []*apiextv1.CustomResourceDefinition
	crdErr  error
)

// crds renders Istio's CRDs (the kinds the primary reads), where the mesh config lives.
func (r *renderer) crds() {
	crdOnce.Do(func() { crdDefs, crdErr = istiocrd.Definitions() })
	if crdErr != nil && r.err == nil {
		r.err = crdErr
	}
	for _, def := range crdDefs {
		crd := def.DeepCopy()
		crd.TypeMeta = typeMeta("apiextensions.k8s.io/v1", "CustomResourceDefinition")
		crd.Labels = r.labels(crd.Labels)
		r.add(crd)
	}
}

// rootCert renders Istio's root certificate ConfigMap: what workloads and the gateway
// verify the control plane with.
func (r *renderer) rootCert() {
	if slices.ContainsFunc(r.out, func(u *unstructured.Unstructured) bool {
		return u.GetKind() == "ConfigMap" && u.GetName() == RootCertConfigMap
	}) {
		return
	}
	r.add(&corev1.ConfigMap{TypeMeta: typeMeta("v1", "ConfigMap"), ObjectMeta: r.meta(RootCertConfigMap, true, nil),
		Data: map[string]string{trust.RootCertFile: string(r.v.CA[trust.RootCertFile])}})
}

// remoteControlPlane renders the remote's selector-less istiod Service and its
// EndpointSlice at the control plane's address (the primary network's gateway), as
// Istio's remote profile does, so that in-cluster clients dial istiod.<ns>.svc:15012.
func (r *renderer) remoteControlPlane() {
	ap := netip.MustParseAddrPort(r.v.ControlPlane.Address) // validated
	r.add(&corev1.Service{TypeMeta: typeMeta("v1", "Service"), ObjectMeta: r.meta(PrimaryServiceName, true, nil),
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc-xds-tls", Port: PortControlPlane,
			TargetPort: intstr.FromInt32(int32(ap.Port())), Protocol: corev1.ProtocolTCP}}}})
	family := discoveryv1.AddressTypeIPv4
	if ap.Addr().Is6() {
		family = discoveryv1.AddressTypeIPv6
	}
	r.add(&discoveryv1.EndpointSlice{TypeMeta: typeMeta("discovery.k8s.io/v1", "EndpointSlice"),
		ObjectMeta: r.meta(PrimaryServiceName+"-remote", true, map[string]string{
			discoveryv1.LabelServiceName: PrimaryServiceName, discoveryv1.LabelManagedBy: "isthmus.io"}),
		AddressType: family,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{ap.Addr().Unmap().String()}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(true)}}},
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("grpc-xds-tls"), Port: ptr(int32(ap.Port())), Protocol: ptr(corev1.ProtocolTCP)}}})
}

// gateway renders the network's east-west gateway: an identity that may only request
// its own token (its credential to the control plane), the root it verifies the control
// plane with, a Deployment and a Service labelled with the network.
func (r *renderer) gateway() {
	v := r.v
	r.add(&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: r.meta(GatewayName, true, nil)})
	r.role(GatewayName, GatewayName, []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"serviceaccounts/token"},
		ResourceNames: []string{GatewayName}, Verbs: []string{"create"}}})
	r.rootCert()

	xds := PrimaryServiceName + "." + v.Namespace + ".svc:" + strconv.Itoa(PortControlPlane)
	if v.Role == RoleGateway || v.Role == RoleConfig {
		xds = v.ControlPlane.Address // no istiod Service in this cluster
	}
	args := []string{"gateway", "--network", v.Network, "--cluster-id", v.ClusterID,
		"--listen", ":" + strconv.Itoa(PortMTLS), "--http-address", ":" + strconv.Itoa(PortGatewayAdmin),
		"--xds-address", xds, "--xds-server-name", PrimaryServiceName + "." + v.Namespace + ".svc",
		"--xds-root-cert", "/etc/istio/root/" + trust.RootCertFile, "--service-account", v.Namespace + "/" + GatewayName}
	ports := []corev1.ContainerPort{
		{Name: "tls", ContainerPort: PortMTLS, Protocol: corev1.ProtocolTCP},
		{Name: "http-status", ContainerPort: PortGatewayAdmin, Protocol: corev1.ProtocolTCP},
	}
	svcPorts := []corev1.ServicePort{{Name: "tls", Port: PortMTLS, TargetPort: intstr.FromInt32(PortMTLS), Protocol: corev1.ProtocolTCP, NodePort: v.Gateway.NodePort}}
	if *v.Gateway.ForwardControlPlane {
		target := PrimaryServiceName + "." + v.Namespace + ".svc:" + strconv.Itoa(PortControlPlane)
		if v.Role != RolePrimary {
			target = v.ControlPlane.Address
		}
		args = append(args, "--forward", ":"+strconv.Itoa(PortControlPlane)+"="+target)
		ports = append(ports, corev1.ContainerPort{Name: "tls-istiod", ContainerPort: PortControlPlane, Protocol: corev1.ProtocolTCP})
		svcPorts = append(svcPorts, corev1.ServicePort{Name: "tls-istiod", Port: PortControlPlane, TargetPort: intstr.FromInt32(PortControlPlane), Protocol: corev1.ProtocolTCP})
	}
	selector := map[string]string{"app": GatewayName}
	podLabels := map[string]string{"app": GatewayName, label.TopologyNetwork.Name: v.Network}
	r.add(r.deployment(GatewayName, selector, v.Gateway.Replicas, corev1.Container{
		Name: "gateway", Args: args, Ports: ports, ReadinessProbe: httpProbe(PortGatewayAdmin),
		VolumeMounts: []corev1.VolumeMount{{Name: "root", MountPath: "/etc/istio/root", ReadOnly: true}},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: mustQuantity("50m"), corev1.ResourceMemory: mustQuantity("64Mi")}},
	}, []corev1.Volume{{Name: "root", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
		LocalObjectReference: corev1.LocalObjectReference{Name: RootCertConfigMap}}}}}, podLabels))
	r.add(&corev1.Service{TypeMeta: typeMeta("v1", "Service"),
		ObjectMeta: r.meta(GatewayName, true, map[string]string{"app": GatewayName, label.TopologyNetwork.Name: v.Network}),
		Spec:       corev1.ServiceSpec{Type: v.Gateway.ServiceType, Selector: selector, Ports: svcPorts}})
}

// ingress renders the ingress gateway: an identity that may request its own token (its
// credential to the control plane and the CA) and read the trust bundle store, a
// Deployment of `isthmus proxy --mode ingress` with the pod labels Gateway selectors
// match, and a Service of the Gateway ports. The proxy runs as non-root with no
// capabilities; the pod's net.ipv4.ip_unprivileged_port_start=0 (a safe sysctl) lets it
// open the ports Gateways name (80, 443), as Istio's gateways do.
func (r *renderer) ingress() {
	v := r.v
	r.add(&corev1.ServiceAccount{TypeMeta: typeMeta("v1", "ServiceAccount"), ObjectMeta: r.meta(IngressAccount, true, nil)})
	r.role(IngressName, IngressAccount, []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"serviceaccounts/token"}, ResourceNames: []string{IngressAccount}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{trust.BundleConfigMap}, Verbs: []string{"get", "list", "watch"}},
	})
	r.rootCert()
	xds := PrimaryServiceName + "." + v.Namespace + ".svc:" + strconv.Itoa(PortControlPlane)
	if v.Role == RoleRemote {
		xds = v.ControlPlane.Address
	}
	args := []string{"proxy", "--mode", "ingress", "--network", v.Network, "--cluster-id", v.ClusterID, "--name", "$(POD_NAME)",
		"--label", "istio=ingressgateway", "--http-address", ":" + strconv.Itoa(PortGatewayAdmin),
		"--xds-address", xds, "--xds-server-name", PrimaryServiceName + "." + v.Namespace + ".svc",
		"--xds-root-cert", "/etc/istio/root/" + trust.RootCertFile, "--service-account", v.Namespace + "/" + IngressAccount}
	ports := []corev1.ContainerPort{{Name: "http-status", ContainerPort: PortGatewayAdmin, Protocol: corev1.ProtocolTCP}}
	var svcPorts []corev1.ServicePort
	for _, p := range v.Ingress.Ports {
		name := "port-" + strconv.Itoa(int(p))
		ports = append(ports, corev1.ContainerPort{Name: name, ContainerPort: p, Protocol: corev1.ProtocolTCP})
		svcPorts = append(svcPorts, corev1.ServicePort{Name: name, Port: p, TargetPort: intstr.FromInt32(p), Protocol: corev1.ProtocolTCP})
	}
	selector := map[string]string{"app": IngressName}
	podLabels := map[string]string{"app": IngressName, "istio": "ingressgateway", label.TopologyNetwork.Name: v.Network}
	d := r.deployment(IngressName, selector, v.Ingress.Replicas, corev1.Container{
		Name: "ingress", Args: args, Ports: ports, ReadinessProbe: httpProbe(PortGatewayAdmin),
		Env:          []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
		VolumeMounts: []corev1.VolumeMount{{Name: "root", MountPath: "/etc/istio/root", ReadOnly: true}},
		Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
			corev1.ResourceCPU: mustQuantity("100m"), corev1.ResourceMemory: mustQuantity("64Mi")}},
	}, []corev1.Volume{{Name: "root", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
		LocalObjectReference: corev1.LocalObjectReference{Name: RootCertConfigMap}}}}}, podLabels)
	d.Spec.Template.Spec.ServiceAccountName = IngressAccount
	d.Spec.Template.Spec.SecurityContext.Sysctls = []corev1.Sysctl{{Name: "net.ipv4.ip_unprivileged_port_start", Value: "0"}}
	r.add(d)
	r.add(&corev1.Service{TypeMeta: typeMeta("v1", "Service"),
		ObjectMeta: r.meta(IngressName, true, map[string]string{"app": IngressName, "istio": "ingressgateway"}),
		Spec:       corev1.ServiceSpec{Type: v.Ingress.ServiceType, Selector: selector, Ports: svcPorts}})
}

// remoteSecrets renders the given remote secrets into the namespace, data merged from
// stringData (stringData is write-only: applying it again would never compare equal).
func (r *renderer) remoteSecrets() {
	for _, s := range r.v.RemoteSecrets {
		data := map[string][]byte{}
		maps.Copy(data, s.Data)
		for k, val := range s.StringData {
			data[k] = []byte(val)
		}
		labels := r.labels(nil)
		for k, val := range s.Labels {
			if _, ours := labels[k]; !ours {
				labels[k] = val
			}
		}
		r.add(&corev1.Secret{TypeMeta: typeMeta("v1", "Secret"),
			ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: r.v.Namespace, Labels: labels, Annotations: maps.Clone(s.Annotations)},
			Type:       corev1.SecretTypeOpaque, Data: data})
	}
}

// deployment renders a hardened Deployment of one isthmus container.
func (r *renderer) deployment(name string, selector map[string]string, replicas int32, c corev1.Container, volumes []corev1.Volume, podLabels map[string]string) *appsv1.Deployment {
	if podLabels == nil {
		podLabels = selector
	}
	c.Image = r.v.Image
	c.ImagePullPolicy = r.v.ImagePullPolicy
	c.SecurityContext = &corev1.SecurityContext{
		RunAsNonRoot: ptr(true), ReadOnlyRootFilesystem: ptr(true), AllowPrivilegeEscalation: ptr(false),
		Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
	}
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "tmp", MountPath: "/tmp"})
	volumes = append(volumes, corev1.Volume{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
	tmpl := r.labels(podLabels)
	tmpl["sidecar.istio.io/inject"] = "false"
	return &appsv1.Deployment{TypeMeta: typeMeta("apps/v1", "Deployment"), ObjectMeta: r.meta(name, true, selector),
		Spec: appsv1.DeploymentSpec{
			Replicas: ptr(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: selector},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: tmpl},
				Spec: corev1.PodSpec{
					ServiceAccountName: name,
					SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: ptr(true), RunAsUser: ptr(int64(ImageUID)), RunAsGroup: ptr(int64(ImageUID)),
						SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
					Containers: []corev1.Container{c},
					Volumes:    volumes,
				},
			},
		}}
}

func httpProbe(port int32) *corev1.Probe {
	return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/readyz", Port: intstr.FromInt32(port)}},
		PeriodSeconds: 5}
}

func typeMeta(apiVersion, kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: apiVersion, Kind: kind}
}

func ptr[T any](v T) *T { return &v }
