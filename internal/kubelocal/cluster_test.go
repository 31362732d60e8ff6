package kubelocal_test

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// shared are three clusters started at once for the whole package.
var shared []*kubelocal.Cluster

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		orphanChild(mode) // never returns
	}
	flag.Parse()
	if f := flag.Lookup("test.run"); f != nil && f.Value.String() == "^$" {
		os.Exit(m.Run()) // benchmarks only: no shared clusters loading the machine
	}
	os.Exit(kubetest.Main(m, 3, "kl", func(c []*kubelocal.Cluster) (func(), error) {
		shared = c
		return func() {}, nil
	}))
}

func needClusters(t *testing.T) {
	t.Helper()
	if shared == nil {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
}

// waitFor polls cond until it returns true or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		ok, err := cond()
		if ok {
			return
		}
		lastErr = err
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
}

func client(t *testing.T, c *kubelocal.Cluster) kubernetes.Interface {
	t.Helper()
	cs, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func createNamespace(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	// Pods need the namespace's default service account, made by the real controller.
	waitFor(t, 30*time.Second, "default service account in "+name, func() (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts(name).Get(context.Background(), "default", metav1.GetOptions{})
		return err == nil, err
	})
}

func pod(ns, name string, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "echo"}, Annotations: annotations},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "echo", Image: "isthmus/echo",
			Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: 8080}},
		}}},
	}
}

// sliceAddresses returns ready and not-ready endpoint addresses of the service's slices.
func sliceAddresses(cs kubernetes.Interface, ns, svc string) (ready, notReady []string, zones []string, err error) {
	slices, err := cs.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		return nil, nil, nil, err
	}
	for _, s := range slices.Items {
		for _, ep := range s.Endpoints {
			if ep.Zone != nil {
				zones = append(zones, *ep.Zone)
			}
			if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
				ready = append(ready, ep.Addresses...)
			} else {
				notReady = append(notReady, ep.Addresses...)
			}
		}
	}
	return ready, notReady, zones, nil
}

func TestEndpointSlicesFromRealControllerInThreeClusters(t *testing.T) {
	needClusters(t)
	if len(shared) != 3 {
		t.Fatalf("want 3 shared clusters, have %d", len(shared))
	}
	ctx := context.Background()
	for i, c := range shared {
		t.Run(c.Name, func(t *testing.T) {
			cs := client(t, c)
			createNamespace(t, cs, "demo")
			_, err := cs.CoreV1().Services("demo").Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"},
				Spec: corev1.ServiceSpec{
					Selector: map[string]string{"app": "echo"},
					Ports:    []corev1.ServicePort{{Name: "grpc", Port: 8080, TargetPort: intstr.FromString("grpc")}},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			chosen := fmt.Sprintf("192.168.%d.7", 100+i)
			for _, p := range []*corev1.Pod{
				pod("demo", "echo-a", map[string]string{kubelocal.PodIPAnnotation: chosen}),
				pod("demo", "echo-b", nil),
			} {
				if _, err := cs.CoreV1().Pods("demo").Create(ctx, p, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			var ready []string
			waitFor(t, 30*time.Second, "an EndpointSlice with both pods", func() (bool, error) {
				var zones []string
				var err error
				ready, _, zones, err = sliceAddresses(cs, "demo", "echo")
				return len(ready) == 2 && len(zones) == 2, err
			})
			if !slices.Contains(ready, chosen) {
				t.Fatalf("slice addresses %v do not include the chosen pod IP %s", ready, chosen)
			}
			b, err := cs.CoreV1().Pods("demo").Get(ctx, "echo-b", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			wantCIDR := netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", 10+i))
			if ip, err := netip.ParseAddr(b.Status.PodIP); err != nil || !wantCIDR.Contains(ip) || !slices.Contains(ready, b.Status.PodIP) {
				t.Fatalf("assigned pod IP %q not in %s or not in the slice %v", b.Status.PodIP, wantCIDR, ready)
			}
			if b.Spec.NodeName != c.NodeName {
				t.Fatalf("pod bound to %q, want %q", b.Spec.NodeName, c.NodeName)
			}
		})
	}
}

func TestNotReadyAndDeletedPods(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	cs := client(t, shared[0])
	createNamespace(t, cs, "lifecycle")
	if _, err := cs.CoreV1().Services("lifecycle").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "lifecycle", Name: "echo"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*corev1.Pod{
		pod("lifecycle", "up", map[string]string{kubelocal.PodIPAnnotation: "10.99.0.1"}),
		pod("lifecycle", "down", map[string]string{kubelocal.PodIPAnnotation: "10.99.0.2", kubelocal.ReadyAnnotation: "false"}),
		pod("lifecycle", "bad-ip", map[string]string{kubelocal.PodIPAnnotation: "not-an-ip"}),
	} {
		if _, err := cs.CoreV1().Pods("lifecycle").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "one ready and one not-ready endpoint", func() (bool, error) {
		ready, notReady, _, err := sliceAddresses(cs, "lifecycle", "echo")
		return slices.Equal(ready, []string{"10.99.0.1"}) && slices.Equal(notReady, []string{"10.99.0.2"}), err
	})
	waitFor(t, 10*time.Second, "the bad-ip pod to report why it has no IP", func() (bool, error) {
		p, err := cs.CoreV1().Pods("lifecycle").Get(ctx, "bad-ip", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Reason == "InvalidPodIP" && strings.Contains(c.Message, "not-an-ip") {
				return p.Status.PodIP == "", nil
			}
		}
		return false, fmt.Errorf("conditions: %+v", p.Status.Conditions)
	})
	// A normal (graceful) delete completes although no kubelet confirms it.
	if err := cs.CoreV1().Pods("lifecycle").Delete(ctx, "up", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the deleted pod to leave the slice", func() (bool, error) {
		ready, _, _, err := sliceAddresses(cs, "lifecycle", "echo")
		if err != nil {
			return false, err
		}
		_, getErr := cs.CoreV1().Pods("lifecycle").Get(ctx, "up", metav1.GetOptions{})
		return len(ready) == 0 && apierrors.IsNotFound(getErr), getErr
	})
}

func TestServiceAccountTokensAreReal(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	cs := client(t, shared[1])
	createNamespace(t, cs, "tokens")
	if _, err := cs.CoreV1().ServiceAccounts("tokens").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reader"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts("tokens").CreateToken(ctx, "reader", &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{"istio-ca"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	review := func(cs kubernetes.Interface, token string) *authnv1.TokenReview {
		r, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
			Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{"istio-ca"}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	r := review(cs, tr.Status.Token)
	if !r.Status.Authenticated || r.Status.User.Username != "system:serviceaccount:tokens:reader" {
		t.Fatalf("token review: %+v", r.Status)
	}
	// Each cluster has its own signing key: cluster 3 must not accept cluster 2's token.
	if r := review(client(t, shared[2]), tr.Status.Token); r.Status.Authenticated {
		t.Fatalf("another cluster accepted the token: %+v", r.Status)
	}
}

func TestClusterReportsVersionAndNode(t *testing.T) {
	needClusters(t)
	cs := client(t, shared[2])
	v, err := cs.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if v.GitVersion != "v1.37.2" {
		t.Fatalf("server version %q, want v1.37.2", v.GitVersion)
	}
	n, err := cs.CoreV1().Nodes().Get(context.Background(), shared[2].NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels[corev1.LabelTopologyZone] != "zone-3a" || n.Labels[corev1.LabelTopologyRegion] != "region-3" {
		t.Fatalf("node labels %v", n.Labels)
	}
	if err := shared[2].Err(); err != nil {
		t.Fatalf("a component of a healthy cluster reports: %v", err)
	}
}

func startOne(t *testing.T, mutate func(*kubelocal.Config)) (*kubelocal.Cluster, error) {
	t.Helper()
	if shared == nil {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
	set, err := kubetest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	cfg := kubetest.Configs(set, t.TempDir(), "solo", 1)[0]
	cfg.StartTimeout = 60 * time.Second
	if mutate != nil {
		mutate(&cfg)
	}
	c, err := kubelocal.Start(context.Background(), cfg)
	if c != nil {
		t.Cleanup(c.Stop)
	}
	return c, err
}

func TestCrashedAPIServerIsReportedWithLogTail(t *testing.T) {
	start := time.Now()
	_, err := startOne(t, func(c *kubelocal.Config) { c.ExtraAPIServerArgs = []string{"--no-such-flag=1"} })
	if err == nil {
		t.Fatal("Start succeeded with a broken API server flag")
	}
	for _, want := range []string{"kube-apiserver", "exit status", "no-such-flag", "last lines of"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("reporting the crash took %s; it should not wait for the start timeout", d)
	}
}

func TestStopLeavesNoProcessOrPort(t *testing.T) {
	c, err := startOne(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	pids := c.PIDs()
	if len(pids) != 3 {
		t.Fatalf("want etcd, apiserver and controller manager, got %v", pids)
	}
	port := c.URL[strings.LastIndex(c.URL, ":")+1:]
	c.Stop()
	for name, pid := range pids {
		if alive(pid) {
			t.Errorf("%s (pid %d) still running after Stop", name, pid)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatalf("API server port %s still taken after Stop: %v", port, err)
	}
	l.Close()
}

func TestPortTakenBeforeBindIsRetried(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	calls := 0
	c, err := startOne(t, func(cfg *kubelocal.Config) {
		kubelocal.SetPortPicker(cfg, func(host string) (int, error) {
			calls++
			if calls == 1 { // etcd's client port: hand out the taken one once
				return taken.Addr().(*net.TCPAddr).Port, nil
			}
			return kubelocal.FreePort(host)
		})
	})
	if err != nil {
		t.Fatalf("Start did not recover from a taken port: %v", err)
	}
	if calls < 4 {
		t.Fatalf("port picker called %d times; the taken port was not retried", calls)
	}
	if _, err := c.Client(); err != nil {
		t.Fatal(err)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	return i < 0 || i+2 >= len(data) || data[i+2] != 'Z'
}

const childEnv = "ISTHMUS_KUBELOCAL_ORPHAN_CHILD"

// orphanChild is the child half of TestNoOrphansWhenTheTestProcessDies, run from
// TestMain: it starts a cluster, records its PIDs, then dies the way the parent asks.
func orphanChild(mode string) {
	fail := func(err error) { fmt.Fprintln(os.Stderr, "orphan child:", err); os.Exit(3) }
	set, err := kubetest.Binaries()
	if err != nil {
		fail(err)
	}
	dir := os.Getenv(childEnv + "_DIR")
	c, err := kubelocal.Start(context.Background(), kubetest.Configs(set, dir, "orphan", 1)[0])
	if err != nil {
		fail(err)
	}
	var lines []string
	for _, pid := range c.PIDs() {
		lines = append(lines, strconv.Itoa(pid))
	}
	if err := os.WriteFile(filepath.Join(dir, "pids"), []byte(strings.Join(lines, "\n")), 0o644); err != nil {
		fail(err)
	}
	switch mode {
	case "panic":
		panic("simulated test panic with a running cluster")
	case "sigkill":
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
	case "interrupt":
		syscall.Kill(os.Getpid(), syscall.SIGINT)
	}
	select {} // the signal ends the process
}

func TestNoOrphansWhenTheTestProcessDies(t *testing.T) {
	needClusters(t)
	for _, mode := range []string{"panic", "sigkill", "interrupt"} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0])
			cmd.Env = append(os.Environ(), childEnv+"="+mode, childEnv+"_DIR="+dir)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("child exited cleanly; want it to die by %s\n%s", mode, out)
			}
			data, rerr := os.ReadFile(filepath.Join(dir, "pids"))
			if rerr != nil {
				t.Fatalf("child did not record its cluster: %v\n%s", rerr, out)
			}
			pids := strings.Fields(string(data))
			if len(pids) != 3 {
				t.Fatalf("child recorded %v", pids)
			}
			waitFor(t, 10*time.Second, "every cluster process to be gone", func() (bool, error) {
				for _, p := range pids {
					pid, _ := strconv.Atoi(p)
					if alive(pid) {
						return false, fmt.Errorf("pid %d still alive", pid)
					}
				}
				return true, nil
			})
		})
	}
}
