package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiobin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/remote"
)

// The Istio interop tests run Istio's own tools, built from istio.io/istio at
// istiobin.Version (`make peers`), against real local clusters and Isthmus processes.

const echoHost = "echo.demo.svc.cluster.local"

// istioPeers returns the built istiod and istioctl, skipping the test when they have not
// been built: CI builds them before the tests (.ci/run, `make peers`), a cold build is 15-35
// minutes and does not belong in a test's timeout.
func istioPeers(t *testing.T) *istiobin.Set {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: real API servers and Istio's own binaries; runs without -short")
	}
	set, err := istiobin.Lookup(istiobin.Options{})
	if err != nil {
		t.Skipf("Istio interop needs istiod and istioctl built: %v", err)
	}
	return set
}

// istioctl runs istioctl with its own HOME (no user configuration leaks in) and returns
// stdout, stderr and the error.
func istioctl(t *testing.T, set *istiobin.Set, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(set.Path(istiobin.Istioctl), args...)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// parseSecret decodes a Secret printed as YAML by istioctl or isthmus.
func parseSecret(t *testing.T, out string) *corev1.Secret {
	t.Helper()
	var s corev1.Secret
	if err := yaml.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("not a Secret: %v\n%s", err, out)
	}
	return &s
}

// applySecret creates s in namespace istio-system of the cluster c talks to, or replaces
// the data of the secret of that name.
func applySecret(t *testing.T, c kubernetes.Interface, s *corev1.Secret) {
	t.Helper()
	ctx := context.Background()
	secrets := c.CoreV1().Secrets("istio-system")
	s.Namespace = "istio-system"
	existing, err := secrets.Get(ctx, s.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = secrets.Create(ctx, s, metav1.CreateOptions{})
	case err == nil:
		existing.Data, existing.StringData, existing.Labels = s.Data, s.StringData, s.Labels
		_, err = secrets.Update(ctx, existing, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

// ensureNamespace creates namespace ns in c unless it exists.
func ensureNamespace(t *testing.T, c kubernetes.Interface, ns string) {
	t.Helper()
	_, err := c.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// addEcho creates Service demo/echo and one Pod behind it in c, and waits until the
// controller manager has published the Pod's EndpointSlice; it returns the Pod's IP. No
// test dials it: the control planes only read it.
func addEcho(t *testing.T, c kubernetes.Interface) string {
	t.Helper()
	ctx := context.Background()
	ensureNamespace(t, c, "demo")
	_, err := c.CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "default service account in demo", func() error {
		_, err := c.CoreV1().ServiceAccounts("demo").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	_, err = c.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-a", Namespace: "demo", Labels: map[string]string{"app": "echo"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "echo",
			Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: 8080}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var ip string
	kubetest.Eventually(t, 30*time.Second, "echo's EndpointSlice", func() error {
		slices, err := c.DiscoveryV1().EndpointSlices("demo").List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=echo"})
		if err != nil {
			return err
		}
		for _, s := range slices.Items {
			for _, e := range s.Endpoints {
				if len(e.Addresses) > 0 && e.Conditions.Ready != nil && *e.Conditions.Ready {
					ip = e.Addresses[0]
					return nil
				}
			}
		}
		return fmt.Errorf("no ready endpoint in %d slices", len(slices.Items))
	})
	return ip
}

// getJSON decodes the JSON body of GET url into v.
func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// TestIstioctlRemoteSecretsWorkWithIsthmus is the first interop direction: secrets made by
// Istio's own `istioctl create-remote-secret` against real local clusters drive an Isthmus
// primary. It runs as an external control plane whose --kubeconfig is the credential of
// `istioctl create-remote-secret --type config` for its config cluster c-1, and watches
// c-2 through the secret of `istioctl create-remote-secret` (--type remote, istioctl's own
// istio-reader-service-account). Both are legacy service-account token Secrets, which the
// local clusters' token controller fills as every real cluster's does. The primary must
// report both clusters synced and serve a service defined in each.
func TestIstioctlRemoteSecretsWorkWithIsthmus(t *testing.T) {
	set := istioPeers(t)
	clusters := kubetest.Start(t, 2)
	bin := buildIsthmus(t)
	admin := make([]kubernetes.Interface, len(clusters))
	for i, c := range clusters {
		var err error
		if admin[i], err = c.Client(); err != nil {
			t.Fatal(err)
		}
	}
	ensureNamespace(t, admin[0], "istio-system")

	// --type remote: istioctl installs Istio's reader in c-2 and prints its secret.
	stdout, stderr, err := istioctl(t, set, "create-remote-secret", "--kubeconfig", clusters[1].Kubeconfig, "--name", "c-2")
	if err != nil {
		t.Fatalf("istioctl create-remote-secret --type remote: %v\n%s", err, stderr)
	}
	remoteSecret := parseSecret(t, stdout)
	if remoteSecret.Name != remote.SecretNamePrefix+"c-2" || !remote.IsRemoteSecret(remoteSecret) {
		t.Fatalf("istioctl's remote secret: %s %v", remoteSecret.Name, remoteSecret.Labels)
	}
	creds, err := remote.ParseSecret(remoteSecret, remote.Policy{})
	if err != nil || len(creds) != 1 || creds[0].Err != nil || creds[0].Cluster != "c-2" {
		t.Fatalf("istioctl's remote secret does not parse as one credential for c-2: %v %+v", err, creds)
	}
	applySecret(t, admin[0], remoteSecret)

	// --type config: the config cluster's credential. istioctl makes no RBAC for it (an
	// Istio install has made istiod's); `isthmus remote-secret create --type config` makes
	// an account with exactly what an external Isthmus primary reads, and istioctl then
	// issues the secret for that account.
	if _, stderr, err := run(t, bin, "remote-secret", "create", "--type", "config", "--kubeconfig", clusters[0].Kubeconfig,
		"--name", "c-1", "--service-account", "isthmus-external"); err != nil {
		t.Fatalf("isthmus remote-secret create --type config: %v\n%s", err, stderr)
	}
	stdout, stderr, err = istioctl(t, set, "create-remote-secret", "--type", "config", "--kubeconfig", clusters[0].Kubeconfig,
		"--name", "c-1", "--service-account", "isthmus-external", "--create-service-account=false")
	if err != nil {
		t.Fatalf("istioctl create-remote-secret --type config: %v\n%s", err, stderr)
	}
	configSecret := parseSecret(t, stdout)
	kc := configSecret.StringData["config"]
	if kc == "" {
		kc = string(configSecret.Data["config"])
	}
	if configSecret.Name != "istio-kubeconfig" || kc == "" {
		t.Fatalf("istioctl's config secret: %s with keys %v %v", configSecret.Name, keys(configSecret.StringData), configSecret.Data)
	}
	if _, err := remote.ParseKubeconfig([]byte(kc), remote.Policy{}); err != nil {
		t.Fatalf("istioctl's config kubeconfig breaks the strict policy: %v", err)
	}
	configKubeconfig := filepath.Join(t.TempDir(), "config.kubeconfig")
	if err := os.WriteFile(configKubeconfig, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}

	ips := []string{addEcho(t, admin[0]), addEcho(t, admin[1])}
	caDir, rootDir := filepath.Join(t.TempDir(), "ca"), filepath.Join(t.TempDir(), "root")
	if _, stderr, err := run(t, bin, "trust", "init-root", "--out-dir", rootDir); err != nil {
		t.Fatalf("init-root: %v\n%s", err, stderr)
	}
	if _, stderr, err := run(t, bin, "trust", "intermediate", "--root-dir", rootDir, "--cluster", "c-1", "--out-dir", caDir); err != nil {
		t.Fatalf("intermediate: %v\n%s", err, stderr)
	}
	httpAddr := freeAddr(t)
	logPath := startProcess(t, "primary", bin, "primary", "--kubeconfig", configKubeconfig, "--cluster-id", "c-1",
		"--http-address", httpAddr, "--ca-dir", caDir, "--ca-address", freeAddr(t), "--probe-interval", "1s")

	var cz primary.ClusterzResponse
	eventually(t, 60*time.Second, "both clusters synced on istioctl's credentials", func() error {
		stdout, stderr, err := run(t, bin, "status", "--primary", httpAddr, "-o", "json")
		if err != nil {
			return fmt.Errorf("%v: %s\n--- primary log:\n%s", err, stderr, tail(string(mustRead(t, logPath)), 30))
		}
		if err := json.Unmarshal([]byte(stdout), &cz); err != nil {
			return err
		}
		if !cz.Ready || len(cz.Clusters) != 2 || cz.Clusters[0].State != primary.StateSynced || cz.Clusters[1].State != primary.StateSynced {
			return fmt.Errorf("status: %s\n--- primary log:\n%s", stdout, tail(string(mustRead(t, logPath)), 30))
		}
		return nil
	})
	if cz.Clusters[0].ID != "c-1" || cz.Clusters[0].Source != "local" || cz.Clusters[1].ID != "c-2" ||
		!strings.Contains(cz.Clusters[1].Source, "istio-system/istio-remote-secret-c-2") {
		t.Fatalf("clusters: %+v", cz.Clusters)
	}
	eventually(t, 30*time.Second, "echo from both clusters in the primary's registry", func() error {
		var v primary.View
		if err := getJSON("http://"+httpAddr+"/debug/registryz", &v); err != nil {
			return err
		}
		s := v.Service(echoHost)
		if s == nil {
			return fmt.Errorf("no %s in the registry", echoHost)
		}
		for i, id := range []mesh.ClusterID{"c-1", "c-2"} {
			if _, ok := s.VIPs[id]; !ok {
				return fmt.Errorf("%s has no VIP from %s: %+v", echoHost, id, s.VIPs)
			}
			if !hasEndpoint(s.Endpoints, id, ips[i]) {
				return fmt.Errorf("%s has no endpoint %s from %s: %+v", echoHost, ips[i], id, s.Endpoints)
			}
		}
		return nil
	})
}

// hasEndpoint reports whether eps holds address ip from cluster id.
func hasEndpoint(eps []mesh.Endpoint, id mesh.ClusterID, ip string) bool {
	for _, e := range eps {
		if e.Cluster == id && e.Address.String() == ip {
			return true
		}
	}
	return false
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
