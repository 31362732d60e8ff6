package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// meshUnderTest is one mesh of TestMeshPeeringCommands: a real cluster and an `isthmus
// primary` process with mesh federation on.
type meshUnderTest struct {
	t                   *testing.T
	bin, id, td         string
	cluster             *kubelocal.Cluster
	kube                kubernetes.Interface
	mcs                 mcsclient.Interface
	caDir, fedDir, http string
	fedAddr, gossip     string
	logPath             string
	proc                *exec.Cmd
}

func newMeshUnderTest(t *testing.T, bin string, c *kubelocal.Cluster, id, td string) *meshUnderTest {
	t.Helper()
	m := &meshUnderTest{t: t, bin: bin, id: id, td: td, cluster: c, fedDir: filepath.Join(t.TempDir(), "fed"),
		http: freeAddr(t), fedAddr: freeAddr(t), gossip: freeAddr(t), logPath: filepath.Join(t.TempDir(), id+".log")}
	var err error
	if m.kube, err = c.Client(); err != nil {
		t.Fatal(err)
	}
	if m.mcs, err = mcsclient.NewForConfig(c.RESTConfig()); err != nil {
		t.Fatal(err)
	}
	if err := federation.ApplyCRDs(context.Background(), c.RESTConfig()); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"istio-system", "demo", "private"} {
		if _, err := m.kube.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	rootDir := filepath.Join(t.TempDir(), "root")
	m.caDir = filepath.Join(t.TempDir(), "ca")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--trust-domain", td, "--out-dir", rootDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "trust", "intermediate", "--root-dir", rootDir, "--cluster", id+"-c1", "--out-dir", m.caDir); err != nil {
		t.Fatalf("intermediate: %v\n%s", err, stderr)
	}
	m.start()
	t.Cleanup(func() { m.stop(syscall.SIGTERM) })
	return m
}

func (m *meshUnderTest) start() {
	m.t.Helper()
	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		m.t.Fatal(err)
	}
	m.proc = exec.Command(m.bin, "primary", "--kubeconfig", m.cluster.Kubeconfig, "--cluster-id", m.id+"-c1",
		"--trust-domain", m.td, "--ca-dir", m.caDir, "--ca-address", freeAddr(m.t), "--http-address", m.http,
		"--mesh-id", m.id, "--federation-addr", m.fedAddr, "--federation-dir", m.fedDir, "--federation-gossip-addr", m.gossip,
		"--federation-gateway", "127.0.0.1:15443", "--federation-stale-window", "-1s", "--federation-trust-peers")
	m.proc.Stdout, m.proc.Stderr = logf, logf
	if err := m.proc.Start(); err != nil {
		m.t.Fatal(err)
	}
}

// stop signals the primary and waits for it.
func (m *meshUnderTest) stop(sig syscall.Signal) {
	if m.proc == nil {
		return
	}
	_ = m.proc.Process.Signal(sig)
	done := make(chan error, 1)
	go func() { done <- m.proc.Wait() }()
	select {
	case err := <-done:
		if err != nil && sig == syscall.SIGTERM {
			m.t.Errorf("%s: primary did not exit cleanly: %v\n%s", m.id, err, m.log())
		}
	case <-time.After(15 * time.Second):
		_ = m.proc.Process.Kill()
		m.t.Errorf("%s: primary did not stop within 15 s", m.id)
	}
	m.proc = nil
}

func (m *meshUnderTest) log() string { b, _ := os.ReadFile(m.logPath); return string(b) }

func (m *meshUnderTest) peering(args ...string) (string, error) {
	stdout, stderr, err := run(m.t, m.bin, append([]string{"mesh", "peering", "--federation-dir", m.fedDir}, args...)...)
	if err != nil {
		return stdout, fmt.Errorf("%v: %s", err, stderr)
	}
	return stdout, nil
}

func (m *meshUnderTest) list() (federation.PeeringList, error) {
	out, err := m.peering("list", "-o", "json")
	var l federation.PeeringList
	if err == nil {
		err = json.Unmarshal([]byte(out), &l)
	}
	return l, err
}

// registryHosts returns the hostnames in the primary's merged registry.
func (m *meshUnderTest) registryHosts() (string, error) {
	resp, err := http.Get("http://" + m.http + "/debug/registryz")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// gatewayExports returns the export set the primary routes for its gateways (its
// registry's Exports on /debug/registryz), by "namespace/name".
func (m *meshUnderTest) gatewayExports() (map[string][]uint16, error) {
	body, err := m.registryHosts()
	if err != nil {
		return nil, err
	}
	var v struct {
		Exports struct {
			Mesh     string              `json:"mesh"`
			Services map[string][]uint16 `json:"services"`
		}
	}
	if err := json.Unmarshal([]byte(body), &v); err != nil {
		return nil, err
	}
	if len(v.Exports.Services) > 0 && v.Exports.Mesh != m.id {
		return nil, fmt.Errorf("exports under mesh %q, want %q", v.Exports.Mesh, m.id)
	}
	return v.Exports.Services, nil
}

func (m *meshUnderTest) service(ns, name string) {
	m.t.Helper()
	_, err := m.kube.CoreV1().Services(ns).Create(context.Background(), &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}}}, metav1.CreateOptions{})
	if err != nil {
		m.t.Fatal(err)
	}
}

func (m *meshUnderTest) serviceExport(ns, name string) {
	m.t.Helper()
	if _, err := m.mcs.MulticlusterV1alpha1().ServiceExports(ns).Create(context.Background(), &mcsv1a1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}}, metav1.CreateOptions{}); err != nil {
		m.t.Fatal(err)
	}
}

// TestMeshPeeringCommands runs two meshes (two real clusters, two trust domains, two
// `isthmus primary --federation-addr` processes), peers them with `isthmus mesh peering
// token create` and `establish`, and checks export and import end to end: an MCS
// ServiceExport plus the export policy makes echo.demo of mesh-a appear in mesh-b's
// registry as echo.demo.svc.mesh-a.isthmus and as a ServiceImport; a ServiceExport whose
// namespace the policy does not name stays home; unexporting removes the import; a killed
// primary makes the peering FAILING and its imports go, and they come back with it.
func TestMeshPeeringCommands(t *testing.T) {
	clusters := kubetest.Start(t, 2)
	bin := buildIsthmus(t)
	ctx := context.Background()
	a := newMeshUnderTest(t, bin, clusters[0], "mesh-a", "a.example")
	b := newMeshUnderTest(t, bin, clusters[1], "mesh-b", "b.example")

	a.service("demo", "echo")
	a.service("private", "secret")
	a.serviceExport("demo", "echo")
	a.serviceExport("private", "secret") // exported in the cluster, but no policy names "private"
	policy, _ := json.Marshal(federation.ExportPolicy{Rules: []federation.ExportRule{{Peer: "mesh-b", Namespaces: []string{"demo"}}}})
	if _, err := a.kube.CoreV1().ConfigMaps("istio-system").Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: federation.ExportPolicyConfigMap},
		Data: map[string]string{"policy": string(policy)}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	var token string
	kubetest.Eventually(t, 30*time.Second, "token created on mesh-a", func() error {
		out, err := a.peering("token", "create", "--peer", "mesh-b")
		token = strings.TrimSpace(out)
		return err
	})
	kubetest.Eventually(t, 30*time.Second, "mesh-b's federation endpoint up", func() error {
		_, err := b.list()
		return err
	})
	if out, err := b.peering("establish", "--token", "not-a-token"); err == nil || !strings.Contains(err.Error(), "bad peering token") {
		t.Fatalf("establish with garbage: %v %s", err, out)
	}
	kubetest.Eventually(t, 30*time.Second, "mesh-b establishes", func() error {
		_, err := b.peering("establish", "--token", token)
		return err
	})
	if _, err := b.peering("establish", "--token", token, "--name", "again"); err == nil || !strings.Contains(err.Error(), "already") {
		t.Fatalf("token used twice: %v", err)
	}

	const imported = "echo.demo.svc.mesh-a.isthmus"
	start := time.Now()
	kubetest.Eventually(t, 20*time.Second, "mesh-b imports echo from mesh-a", func() error {
		l, err := b.list()
		if err != nil {
			return err
		}
		if len(l.Peerings) != 1 || l.Peerings[0].State != federation.StateActive || l.Peerings[0].Imported != 1 {
			return fmt.Errorf("%+v", l.Peerings)
		}
		hosts, err := b.registryHosts()
		if err != nil || !strings.Contains(hosts, imported) {
			return fmt.Errorf("registry lacks %s: %v", imported, err)
		}
		if strings.Contains(hosts, "secret.private") {
			return fmt.Errorf("a service of a namespace the policy does not export was imported")
		}
		if _, err := b.mcs.MulticlusterV1alpha1().ServiceImports("demo").Get(ctx, federation.ServiceImportName("mesh-a", mesh.ServiceKey{Namespace: "demo", Name: "echo"}), metav1.GetOptions{}); err != nil {
			return err
		}
		return nil
	})
	t.Logf("import visible in mesh-b's registry and as a ServiceImport %s after establish", time.Since(start).Round(time.Millisecond))
	// The exporting primary routes what it exports for its gateways (federation names).
	kubetest.Eventually(t, 20*time.Second, "mesh-a's gateway view exports demo/echo only", func() error {
		ex, err := a.gatewayExports()
		if err != nil {
			return err
		}
		if len(ex) != 1 || !slices.Equal(ex["demo/echo"], []uint16{8080}) {
			return fmt.Errorf("gateway exports %v", ex)
		}
		return nil
	})
	// Bundles exchanged at peering reach each side's trust bundle store (for workloads).
	kubetest.Eventually(t, 20*time.Second, "peer bundles in both bundle stores", func() error {
		for _, c := range []struct {
			m  *meshUnderTest
			td string
		}{{a, "b.example"}, {b, "a.example"}} {
			cm, err := c.m.kube.CoreV1().ConfigMaps("istio-system").Get(ctx, trust.BundleConfigMap, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if cm.Data[c.td+".bundle"] == "" {
				return fmt.Errorf("%s's bundle store lacks %s", c.m.id, c.td)
			}
		}
		return nil
	})
	// Why private/secret is not exported is shown, not silent.
	if l, err := a.list(); err != nil || !strings.Contains(strings.Join(l.Problems, "\n"), "ServiceExport private/secret: no export rule names namespace private") {
		t.Fatalf("problems on mesh-a: %v %q", err, l.Problems)
	}
	if out, err := a.peering("show", "mesh-b"); err != nil || !strings.Contains(out, "ACTIVE") {
		t.Fatalf("show on mesh-a: %v\n%s", err, out)
	}
	if out, err := b.peering("list"); err != nil || !strings.Contains(out, "mesh-a") {
		t.Fatalf("list table: %v\n%s", err, out)
	}

	// Unexport: the ServiceExport goes, the import follows (timed from the Delete call).
	start = time.Now()
	if err := a.mcs.MulticlusterV1alpha1().ServiceExports("demo").Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "unexported echo leaves mesh-b", func() error {
		hosts, err := b.registryHosts()
		if err != nil || strings.Contains(hosts, imported) {
			return fmt.Errorf("still imported (%v)", err)
		}
		return nil
	})
	t.Logf("unexport reached mesh-b's registry in %s", time.Since(start).Round(time.Millisecond))
	kubetest.Eventually(t, 20*time.Second, "unexported echo leaves mesh-a's gateway view", func() error {
		if ex, err := a.gatewayExports(); err != nil || len(ex) != 0 {
			return fmt.Errorf("gateway exports %v (%v)", ex, err)
		}
		return nil
	})
	t.Logf("unexport reached mesh-a's gateway view in %s", time.Since(start).Round(time.Millisecond))
	a.serviceExport("demo", "echo")
	kubetest.Eventually(t, 20*time.Second, "re-exported echo back in mesh-b", func() error {
		if hosts, err := b.registryHosts(); err != nil || !strings.Contains(hosts, imported) {
			return fmt.Errorf("not imported (%v)", err)
		}
		return nil
	})

	// mesh-a's primary dies: FAILING within 5 s, imports withdrawn (stale window -1s).
	killed := time.Now()
	a.stop(syscall.SIGKILL)
	kubetest.Eventually(t, 5*time.Second, "mesh-b sees mesh-a failing", func() error {
		l, err := b.list()
		if err != nil || l.Peerings[0].State != federation.StateFailing || l.Peerings[0].Imported != 0 {
			return fmt.Errorf("%v %+v", err, l.Peerings)
		}
		return nil
	})
	t.Logf("peer failure seen and imports withdrawn in %s", time.Since(killed).Round(time.Millisecond))
	a.start()
	kubetest.Eventually(t, 30*time.Second, "mesh-a back: ACTIVE and imported again", func() error {
		l, err := b.list()
		if err != nil || l.Peerings[0].State != federation.StateActive || l.Peerings[0].Imported != 1 {
			return fmt.Errorf("%v %+v", err, l.Peerings)
		}
		return nil
	})

	// Delete on mesh-a: mesh-b's imports go at once.
	if _, err := a.peering("delete", "mesh-b"); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 10*time.Second, "imports gone after delete", func() error {
		hosts, err := b.registryHosts()
		if err != nil || strings.Contains(hosts, imported) {
			return fmt.Errorf("still imported (%v)", err)
		}
		cm, err := a.kube.CoreV1().ConfigMaps("istio-system").Get(ctx, trust.BundleConfigMap, metav1.GetOptions{})
		if err != nil || cm.Data["b.example.bundle"] != "" {
			return fmt.Errorf("mesh-a still trusts b.example after delete (%v)", err)
		}
		return nil
	})
}
