package deploy

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// Rewrite the golden files after an intended change to Render with
//
//	go test ./deploy -short -run Golden -update
//
// then read the diff of testdata/ before committing it. The first run with -update also
// writes the fixed test CA under testdata/ca (kept, so the goldens stay stable).
var update = flag.Bool("update", false, "rewrite deploy/testdata/*.golden from Render's output")

// testCA returns the committed plug-in CA files of the golden tests.
func testCA(t testing.TB) map[string][]byte {
	t.Helper()
	dir := filepath.Join("testdata", "ca")
	if _, err := os.Stat(dir); os.IsNotExist(err) && *update {
		root, err := trust.NewRoot("cluster.local", trust.RootOptions{})
		if err != nil {
			t.Fatal(err)
		}
		in, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: "cluster-1", TTL: 10 * 365 * 24 * 3600e9})
		if err != nil {
			t.Fatal(err)
		}
		if err := in.WriteDir(dir); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string][]byte{}
	for _, name := range []string{trust.CACertFile, trust.CAKeyFile, trust.RootCertFile, trust.CertChainFile} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		files[name] = data
	}
	return files
}

// testKubeconfig is a kubeconfig the strict policy accepts (https, inline CA, a token).
func testKubeconfig(cluster string) []byte {
	return []byte(`apiVersion: v1
kind: Config
clusters:
- name: ` + cluster + `
  cluster:
    server: https://192.0.2.10:6443
    certificate-authority-data: ` + "TFMwdExTMUNSVWRKVGlCRFJWSlVTVVpKUTBGVVJTMHRMUzB0Q2c9PQ==" + `
users:
- name: ` + cluster + `
  user:
    token: reader-token
contexts:
- name: ` + cluster + `
  context: {cluster: ` + cluster + `, user: ` + cluster + `}
current-context: ` + cluster + `
`)
}

func remoteSecret(cluster string) *corev1.Secret {
	return remote.NewSecret("istio-system", mesh.ClusterID(cluster), testKubeconfig(cluster))
}

func configCredential(cluster string) *corev1.Secret {
	s := remoteSecret(cluster)
	delete(s.Labels, remote.MultiClusterLabel)
	s.Name = "istio-config-secret-" + cluster
	return s
}

// goldenCases are one cluster of every model in every role it has.
func goldenCases(t testing.TB) map[string]Values {
	ca := testCA(t)
	root := map[string][]byte{trust.RootCertFile: ca[trust.RootCertFile]}
	base := func(m Model, r Role, cluster, network string) Values {
		v := Values{Model: m, Role: r, ClusterID: cluster, Network: network, Image: "isthmus:v0.0.0-test", CA: root}
		if r == RolePrimary {
			v.CA = ca
		}
		return v
	}
	withRemote := func(v Values, clusters ...string) Values {
		for _, c := range clusters {
			v.RemoteSecrets = append(v.RemoteSecrets, remoteSecret(c))
		}
		return v
	}
	cp := func(v Values, cluster, addr string) Values {
		v.ControlPlane = ControlPlaneValues{Cluster: cluster, Address: addr}
		return v
	}
	nodePort := func(v Values) Values {
		v.Gateway.ServiceType = corev1.ServiceTypeNodePort
		v.Gateway.NodePort = 31443
		return v
	}
	mnPrimary := withRemote(base(ModelMultiNetwork, RolePrimary, "cluster-1", "network-1"), "cluster-2")
	mnPrimary.Primary.Gateways = []string{"network-2=192.0.2.40:31443"}
	withIngress := withRemote(base(ModelMultiNetwork, RolePrimary, "cluster-1", "network-1"), "cluster-2")
	withIngress.Ingress.Enabled = true
	ext := base(ModelExternalControlPlane, RolePrimary, "cp-host", "")
	ext.ConfigCredential = configCredential("cluster-1")
	return map[string]Values{
		"single-cluster-primary":         base(ModelSingleCluster, RolePrimary, "cluster-1", ""),
		"multi-primary-primary":          withRemote(base(ModelMultiPrimary, RolePrimary, "cluster-1", ""), "cluster-2"),
		"multi-network-primary":          mnPrimary,
		"multi-network-primary-ingress":  withIngress,
		"multi-network-gateway":          nodePort(cp(base(ModelMultiNetwork, RoleGateway, "cluster-3", "network-3"), "cluster-1", "192.0.2.20:15012")),
		"primary-remote-primary":         withRemote(base(ModelPrimaryRemote, RolePrimary, "cluster-1", "network-1"), "cluster-2"),
		"primary-remote-remote":          cp(base(ModelPrimaryRemote, RoleRemote, "cluster-2", "network-2"), "cluster-1", "192.0.2.20:15012"),
		"external-control-plane-primary": ext,
		"external-control-plane-config":  withRemote(cp(base(ModelExternalControlPlane, RoleConfig, "cluster-1", "network-1"), "", "192.0.2.30:15012"), "cluster-2"),
		"external-control-plane-remote":  cp(base(ModelExternalControlPlane, RoleRemote, "cluster-2", "network-2"), "cluster-1", "192.0.2.20:15012"),
	}
}

// goldenYAML is Render's YAML with each CRD's spec left out: the CRDs are Istio's own
// (internal/istiocrd tests them), half a megabyte each time.
func goldenYAML(t *testing.T, objs []*unstructured.Unstructured) []byte {
	t.Helper()
	short := make([]*unstructured.Unstructured, len(objs))
	for i, o := range objs {
		short[i] = o
		if o.GetKind() == "CustomResourceDefinition" {
			c := o.DeepCopy()
			c.Object["spec"] = "(Istio's definition from internal/istiocrd, left out here)"
			short[i] = c
		}
	}
	var b bytes.Buffer
	if err := Encode(&b, short, "yaml"); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestRenderGolden compares Render's output for every model and role with
// testdata/<model>-<role>.golden, and checks that rendering twice gives the same bytes.
func TestRenderGolden(t *testing.T) {
	for name, v := range goldenCases(t) {
		t.Run(name, func(t *testing.T) {
			objs, err := Render(v)
			if err != nil {
				t.Fatal(err)
			}
			got := goldenYAML(t, objs)
			again, _ := Render(v)
			if !bytes.Equal(got, goldenYAML(t, again)) {
				t.Fatal("Render is not deterministic")
			}
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if d := cmp.Diff(string(want), string(got)); d != "" {
				t.Errorf("Render(%s) differs from %s (-want +got):\n%s", name, path, d)
			}
		})
	}
}

// TestRenderContracts pins what the golden files only show: the properties each
// deployment model depends on.
func TestRenderContracts(t *testing.T) {
	cases := goldenCases(t)
	find := func(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
		for _, o := range objs {
			if o.GetKind() == kind && o.GetName() == name {
				return o
			}
		}
		return nil
	}
	for name, v := range cases {
		objs, err := Render(v)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, o := range objs {
			if o.GetLabels()[LabelInstall] != "isthmus" || o.GetLabels()[LabelManagedBy] != ManagedBy {
				t.Errorf("%s: %s lacks the install labels", name, refOf(o))
			}
		}
		gw := find(objs, "Service", GatewayName)
		if v.Model.multiNetwork() && v.Role != RolePrimary || (v.Role == RolePrimary && v.Model.multiNetwork() && v.Model != ModelExternalControlPlane) {
			if gw == nil || gw.GetLabels()["topology.istio.io/network"] != v.Network {
				t.Errorf("%s: no gateway Service labelled with network %s", name, v.Network)
			}
		} else if gw != nil {
			t.Errorf("%s: a gateway on a single-network model", name)
		}
		if v.Role == RolePrimary {
			dep := find(objs, "Deployment", PrimaryName)
			if dep == nil || find(objs, "Secret", trust.SecretName) == nil || find(objs, "Service", PrimaryServiceName) == nil {
				t.Fatalf("%s: the primary lacks its Deployment, cacerts or Service", name)
			}
			ports, _, _ := unstructured.NestedSlice(find(objs, "Service", PrimaryServiceName).Object, "spec", "ports")
			var nums []int64
			for _, p := range ports {
				nums = append(nums, p.(map[string]any)["port"].(int64))
			}
			if !cmp.Equal(nums, []int64{15012, 15014}) {
				t.Errorf("%s: primary Service ports %v, want the ports it listens on [15012 15014]", name, nums)
			}
		}
		hasCRD := find(objs, "CustomResourceDefinition", "virtualservices.networking.istio.io") != nil
		wantCRD := v.Role == RoleConfig || (v.Role == RolePrimary && v.Model != ModelExternalControlPlane)
		if hasCRD != wantCRD {
			t.Errorf("%s: Istio CRDs rendered %v, want %v", name, hasCRD, wantCRD)
		}
		for _, o := range objs {
			if o.GetKind() != "ClusterRole" && o.GetKind() != "Role" {
				continue
			}
			rules, _, _ := unstructured.NestedSlice(o.Object, "rules")
			for _, r := range rules {
				rm := r.(map[string]any)
				for _, verb := range rm["verbs"].([]any) {
					res := rm["resources"].([]any)
					if verb == "*" || verb == "delete" || verb == "patch" || (verb == "get" && contains(res, "secrets")) {
						t.Errorf("%s: %s grants %s on %v", name, refOf(o), verb, res)
					}
				}
			}
		}
	}
	ns := find(mustRender(t, cases["primary-remote-remote"]), "Namespace", "istio-system")
	if ns.GetAnnotations()[AnnotationControlPlan] != "cluster-1" {
		t.Errorf("remote namespace annotations %v, want controlPlaneClusters cluster-1", ns.GetAnnotations())
	}
}

func contains(s []any, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func mustRender(t *testing.T, v Values) []*unstructured.Unstructured {
	t.Helper()
	objs, err := Render(v)
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

// TestRenderRefusesBadValues checks that each bad value is refused with an error naming
// its field, and that nothing is rendered.
func TestRenderRefusesBadValues(t *testing.T) {
	good := goldenCases(t)
	mod := func(name string, f func(*Values)) Values {
		v := good[name]
		f(&v)
		return v
	}
	badSecret := remoteSecret("cluster-2")
	badSecret.StringData["cluster-2"] = strings.Replace(string(testKubeconfig("cluster-2")), "token: reader-token", "exec: {command: aws}", 1)
	cases := []struct {
		name string
		v    Values
		want string
	}{
		{"no model", Values{}, "model: required"},
		{"unknown model", Values{Model: "mesh-of-meshes", Role: RolePrimary}, `model: unknown model "mesh-of-meshes" (one of external-control-plane, multi-network`},
		{"no role", Values{Model: ModelMultiNetwork}, "role: required (model multi-network has roles primary, gateway)"},
		{"role not in model", Values{Model: ModelSingleCluster, Role: RoleRemote}, `role: model single-cluster has no role "remote" (its roles: primary)`},
		{"bad cluster ID", mod("single-cluster-primary", func(v *Values) { v.ClusterID = "cluster 1" }), "clusterID:"},
		{"no network on multi-network", mod("multi-network-primary", func(v *Values) { v.Network = "" }), "network: required by model multi-network"},
		{"bad namespace", mod("single-cluster-primary", func(v *Values) { v.Namespace = "Istio System" }), `namespace: "Istio System"`},
		{"no image", mod("single-cluster-primary", func(v *Values) { v.Image = "" }), "image: required"},
		{"pull policy", mod("single-cluster-primary", func(v *Values) { v.ImagePullPolicy = "Sometimes" }), `imagePullPolicy: "Sometimes"`},
		{"log level", mod("single-cluster-primary", func(v *Values) { v.Primary.LogLevel = "loud" }), `primary.logLevel: "loud"`},
		{"gateway on one network", mod("single-cluster-primary", func(v *Values) { v.Gateway.Enabled = ptr(true) }), "gateway.enabled: model single-cluster has one network"},
		{"bad gateway", mod("multi-network-primary", func(v *Values) { v.Primary.Gateways = []string{"network-2=gw:15443"} }), `primary.gateways[0]: "network-2=gw:15443": want NETWORK=IP:PORT`},
		{"gateways on one network", mod("single-cluster-primary", func(v *Values) { v.Primary.Gateways = []string{"n2=192.0.2.1:15443"} }), "primary.gateways: only a primary of a multi-network model"},
		{"service type", mod("multi-network-primary", func(v *Values) { v.Gateway.ServiceType = "ClusterIP" }), `gateway.serviceType: "ClusterIP"`},
		{"node port without NodePort", mod("multi-network-primary", func(v *Values) { v.Gateway.NodePort = 30000 }), "gateway.nodePort: 30000 needs serviceType NodePort"},
		{"ingress on a config cluster", mod("external-control-plane-config", func(v *Values) { v.Ingress.Enabled = true }), "ingress.enabled: role config runs no workloads"},
		{"ingress without network", mod("multi-primary-primary", func(v *Values) { v.Ingress.Enabled = true }), "ingress.enabled: needs network"},
		{"ingress port", mod("multi-network-primary", func(v *Values) { v.Ingress.Enabled, v.Ingress.Ports = true, []int32{443, 443} }), "ingress.ports[1]: 443"},
		{"remote without address", mod("primary-remote-remote", func(v *Values) { v.ControlPlane.Address = "" }), "controlPlane.address: required by role remote"},
		{"bad address", mod("primary-remote-remote", func(v *Values) { v.ControlPlane.Address = "istiod:15012" }), `controlPlane.address: "istiod:15012": want IP:PORT`},
		{"remote without cluster", mod("primary-remote-remote", func(v *Values) { v.ControlPlane.Cluster = "" }), "controlPlane.cluster: required by role remote"},
		{"primary without CA", mod("single-cluster-primary", func(v *Values) { v.CA = nil }), "ca: the primary needs the plug-in CA files"},
		{"remote without root", mod("primary-remote-remote", func(v *Values) { v.CA = nil }), "ca: role remote needs the mesh root (root-cert.pem)"},
		{"root not PEM", mod("primary-remote-remote", func(v *Values) { v.CA = map[string][]byte{trust.RootCertFile: []byte("junk")} }), "ca: root-cert.pem: no PEM certificate"},
		{"remote secret with exec", mod("multi-primary-primary", func(v *Values) { v.RemoteSecrets = []*corev1.Secret{badSecret} }), `remoteSecrets[0] "istio-remote-secret-cluster-2": cluster "cluster-2"`},
		{"not a remote secret", mod("multi-primary-primary", func(v *Values) { v.RemoteSecrets = []*corev1.Secret{configCredential("cluster-2")} }), "label istio/multiCluster=true missing"},
		{"remote secret naming itself", mod("multi-primary-primary", func(v *Values) { v.RemoteSecrets = []*corev1.Secret{remoteSecret("cluster-1")} }), "names this cluster (cluster-1) itself"},
		{"remote secret on a remote", mod("primary-remote-remote", func(v *Values) { v.RemoteSecrets = []*corev1.Secret{remoteSecret("cluster-3")} }), "remoteSecrets: role remote holds none"},
		{"external without credential", mod("external-control-plane-primary", func(v *Values) { v.ConfigCredential = nil }), "configCredential: the external control plane needs"},
		{"credential elsewhere", mod("single-cluster-primary", func(v *Values) { v.ConfigCredential = configCredential("cluster-1") }), "configCredential: only the primary role of external-control-plane"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			objs, err := Render(c.v)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Render: %v, want an error containing %q", err, c.want)
			}
			if objs != nil {
				t.Fatal("objects rendered beside an error")
			}
		})
	}
}

func TestParseValues(t *testing.T) {
	v, err := ParseValues([]byte("model: multi-network\nrole: primary\nclusterID: c1\nnetwork: n1\nimage: isthmus:v1\ngateway: {serviceType: NodePort, nodePort: 31443}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if v.Model != ModelMultiNetwork || v.Gateway.ServiceType != corev1.ServiceTypeNodePort || v.Gateway.NodePort != 31443 {
		t.Errorf("ParseValues: %+v", v)
	}
	for in, want := range map[string]string{
		"model: multi-network\nrol: primary\n": `unknown field "rol"`,
		"model: [x\n":                          "deploy: values:",
		"gateway: {nodePort: high}\n":          "deploy: values:",
	} {
		if _, err := ParseValues([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseValues(%q): %v, want %q", in, err, want)
		}
	}
}

func FuzzParseValues(f *testing.F) {
	f.Add([]byte("model: multi-network\nrole: primary\nclusterID: c1\nnetwork: n1\nimage: isthmus:v1\n"))
	f.Add([]byte("model: primary-remote\nrole: remote\ncontrolPlane: {cluster: c1, address: '10.0.0.1:15012'}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		v, err := ParseValues(data)
		if err != nil {
			return
		}
		objs, err := Render(v) // no CA: a primary is refused; others may render
		if err == nil && len(objs) == 0 {
			t.Fatal("Render accepted values and rendered nothing")
		}
	})
}
