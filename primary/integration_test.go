package primary_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/xds"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/remote"
)

// env is shared by the package's integration tests: three real clusters, a primary on the
// first with remote secrets for the other two, and gRPC echo servers standing in for pods.
var env struct {
	clusters []*kubelocal.Cluster
	clients  []kubernetes.Interface
	istio    istioclient.Interface // cluster 1's, the primary's config cluster
	primary  *primary.Primary
	xdsAddr  string
	debug    *httptest.Server
	servers  sync.Map // pod IP → *grpc.Server
	// pods is the network the echo servers listen on. Kubernetes refuses loopback
	// endpoint addresses, so pod IPs live in a network namespace of their own.
	pods    *netlab.Namespace
	skipWhy string
	// dns answers the primary's lookups of resolution-DNS ServiceEntries, on loopback.
	dns *testDNS
}

const (
	echoHost    = "echo.demo.svc.cluster.local"
	echoPort    = 8080
	staleWindow = 3 * time.Second
	dnsRefresh  = 300 * time.Millisecond
)

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, 3, "pr", setup)) }

func setup(clusters []*kubelocal.Cluster) (func(), error) {
	pods, err := netlab.New("pods")
	if errors.Is(err, netlab.ErrNotRoot) {
		env.skipWhy = "needs root: pod addresses live in a network namespace (CI runs as root)"
		return func() {}, nil
	} else if err != nil {
		return nil, err
	}
	env.pods = pods
	ctx, cancel := context.WithCancel(context.Background())
	env.clusters = clusters
	for _, c := range clusters {
		cs, err := c.Client()
		if err != nil {
			cancel()
			return nil, err
		}
		env.clients = append(env.clients, cs)
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
			cancel()
			return nil, err
		}
	}
	reg := prometheus.NewRegistry()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	istio, err := istioclient.NewForConfig(clusters[0].RESTConfig())
	if err != nil {
		cancel()
		return nil, err
	}
	env.istio = istio
	if env.dns, err = startTestDNS(); err != nil {
		cancel()
		return nil, err
	}
	p, err := primary.New(primary.Config{
		Resolver:      env.dns.Resolver(),
		DNSRefresh:    dnsRefresh,
		ClusterID:     mesh.ClusterID(clusters[0].Name),
		LocalClient:   env.clients[0],
		IstioClient:   istio,
		SyncTimeout:   5 * time.Second,
		StaleWindow:   staleWindow,
		ProbeInterval: 300 * time.Millisecond,
		Debounce:      20 * time.Millisecond,
		Log:           log,
		Metrics:       reg,
	})
	if err != nil {
		cancel()
		return nil, err
	}
	env.primary = p
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		cancel()
		return nil, err
	}
	gs := grpc.NewServer()
	p.RegisterXDS(ctx, gs)
	go gs.Serve(lis)
	env.xdsAddr = lis.Addr().String()
	env.debug = httptest.NewServer(p.Handler(reg))
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	return func() {
		cancel()
		gs.Stop()
		env.debug.Close()
		<-done
		env.servers.Range(func(_, v any) bool { v.(*grpc.Server).Stop(); return true })
		env.dns.Close()
		pods.Close()
	}, nil
}

func needEnv(t *testing.T) {
	t.Helper()
	if env.skipWhy != "" {
		t.Skip(env.skipWhy)
	}
	if env.primary == nil {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
}

// echoServer answers UnaryCall with its server ID (the pod it stands for).
type echoServer struct {
	testgrpc.UnimplementedTestServiceServer
	id string
}

func (e *echoServer) UnaryCall(context.Context, *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{ServerId: e.id}, nil
}

// addPod starts an echo server on ip:8080 and registers a Pod for it in cluster i.
func addPod(t *testing.T, i int, name, ip string) {
	t.Helper()
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(echoPort)))
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, &echoServer{id: env.clusters[i].Name + "/" + name})
	go s.Serve(lis)
	env.servers.Store(ip, s)
	_, err = env.clients[i].CoreV1().Pods("demo").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo", Labels: map[string]string{"app": "echo"},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "echo", Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: echoPort}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func ensureEchoService(t *testing.T, i int) {
	t.Helper()
	ctx := context.Background()
	cs := env.clients[i]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "default service account in demo", func() error {
		_, err := cs.CoreV1().ServiceAccounts("demo").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	_, err := cs.CoreV1().Services("demo").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: echoPort, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// applySecret creates or replaces a remote secret in the primary's cluster.
func applySecret(t *testing.T, s *corev1.Secret) {
	t.Helper()
	secrets := env.clients[0].CoreV1().Secrets("istio-system")
	existing, err := secrets.Get(context.Background(), s.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = secrets.Create(context.Background(), s, metav1.CreateOptions{})
	} else if err == nil {
		existing.Data, existing.StringData = nil, s.StringData
		_, err = secrets.Update(context.Background(), existing, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

func linkCluster(t *testing.T, i int) {
	t.Helper()
	c := env.clusters[i]
	created, err := remote.Create(context.Background(), env.clients[i], c.RESTConfig(), remote.CreateOptions{Cluster: mesh.ClusterID(c.Name)})
	if err != nil {
		t.Fatal(err)
	}
	applySecret(t, created.Secret)
}

// newClient dials the echo service through the primary with grpc-go's proxyless xDS client.
func newClient(t *testing.T) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~127.0.0.1~client-%d.demo~demo.svc.cluster.local",
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q}}
	}`, env.xdsAddr, time.Now().UnixNano(), env.clusters[0].Name)
	rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:%d", echoHost, echoPort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb),
		// The xDS stream goes to the primary on the host; calls go to the pods' network.
		grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// answers makes n calls and returns how many each server gave, and the failures.
func answers(c testgrpc.TestServiceClient, n int) (map[string]int, int) {
	got := map[string]int{}
	failed := 0
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		r, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{FillServerId: true})
		cancel()
		if err != nil {
			failed++
			continue
		}
		got[r.ServerId]++
	}
	return got, failed
}

// clustersAnswering lists the clusters whose servers answered.
func clustersAnswering(got map[string]int) []string {
	seen := map[string]bool{}
	var out []string
	for id := range got {
		c, _, _ := strings.Cut(id, "/")
		if !seen[c] {
			seen[c] = true
			out = append(out, c)
		}
	}
	return out
}

func waitAnswers(t *testing.T, c testgrpc.TestServiceClient, what string, ok func(map[string]int) bool) {
	t.Helper()
	kubetest.Eventually(t, 30*time.Second, what, func() error {
		got, _ := answers(c, 30)
		if !ok(got) {
			return fmt.Errorf("answers: %v", got)
		}
		return nil
	})
}

func clusterz(t *testing.T) primary.ClusterzResponse {
	t.Helper()
	resp, err := http.Get(env.debug.URL + "/debug/clusterz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cz primary.ClusterzResponse
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		t.Fatal(err)
	}
	return cz
}

func statusOf(cz primary.ClusterzResponse, id string) (primary.ClusterStatus, bool) {
	for _, s := range cz.Clusters {
		if string(s.ID) == id {
			return s, true
		}
	}
	return primary.ClusterStatus{}, false
}

// TestProxylessClientReachesAllClusters is the end-to-end path, step by step:
// three clusters, remote secrets made by remote.Create, a grpc-go proxyless client; then a
// new pod, an API server outage past the stale window and back, and a credential rotation
// under load.
func TestProxylessClientReachesAllClusters(t *testing.T) {
	needEnv(t)
	for i := range env.clusters {
		ensureEchoService(t, i)
		addPod(t, i, "echo-a", fmt.Sprintf("10.99.%d.1", 10+i))
	}
	linkCluster(t, 1)
	linkCluster(t, 2)
	client := newClient(t)
	all := func(got map[string]int) bool { return len(clustersAnswering(got)) == 3 }
	waitAnswers(t, client, "answers from all three clusters", all)
	if !env.primary.Ready() {
		t.Fatal("primary not ready although every cluster synced")
	}

	t.Run("new pod in cluster 3 becomes reachable", func(t *testing.T) {
		addPod(t, 2, "echo-b", "10.99.12.2")
		waitAnswers(t, client, "answers from the new pod", func(got map[string]int) bool { return got[env.clusters[2].Name+"/echo-b"] > 0 })
	})

	t.Run("cluster 3 API server down: kept for the stale window, then withdrawn, then restored", func(t *testing.T) {
		c3 := env.clusters[2].Name
		env.clusters[2].StopAPIServer()
		kubetest.Eventually(t, 10*time.Second, c3+" unreachable in clusterz", func() error {
			s, _ := statusOf(clusterz(t), c3)
			if s.State != primary.StateUnreachable || s.Error == "" {
				return fmt.Errorf("%+v", s)
			}
			return nil
		})
		s, _ := statusOf(clusterz(t), c3)
		if s.Withdrawn || s.Endpoints == 0 {
			t.Fatalf("endpoints withdrawn before the stale window ended: %+v", s)
		}
		start := time.Now()
		waitAnswers(t, client, "cluster 3 to be withdrawn", func(got map[string]int) bool {
			return len(got) > 0 && got[c3+"/echo-a"] == 0 && got[c3+"/echo-b"] == 0
		})
		if d := time.Since(start); d > staleWindow+10*time.Second {
			t.Errorf("withdrawal took %s; the stale window is %s", d, staleWindow)
		}
		cz := clusterz(t)
		if s, _ := statusOf(cz, c3); !s.Withdrawn || s.Staleness == "" {
			t.Fatalf("clusterz after withdrawal: %+v", s)
		}
		if !cz.Ready || cz.StaleWindow != staleWindow.String() {
			t.Fatalf("primary must stay ready with one remote down: %+v", cz)
		}
		if got, _ := answers(client, 20); len(clustersAnswering(got)) != 2 {
			t.Fatalf("clusters 1-2 must keep serving: %v", got)
		}
		if err := env.clusters[2].RestartAPIServer(context.Background()); err != nil {
			t.Fatal(err)
		}
		waitAnswers(t, client, "cluster 3 restored", all)
	})

	t.Run("rotating cluster 2's secret causes no failed call", func(t *testing.T) {
		var failed, calls atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, f := answers(client, 1)
				calls.Add(1)
				failed.Add(int64(f))
			}
		})
		c2 := env.clusters[1].Name
		before, _ := statusOf(clusterz(t), c2)
		if before.Credential == "" {
			t.Fatalf("no credential hash in %+v", before)
		}
		linkCluster(t, 1) // a new token: a new credential for the same cluster
		kubetest.Eventually(t, 20*time.Second, "the new credential to be swapped in", func() error {
			s, _ := statusOf(clusterz(t), c2)
			if s.Credential == before.Credential || s.Rotating || s.State != primary.StateSynced {
				return fmt.Errorf("%+v", s)
			}
			return nil
		})
		waitAnswers(t, client, "all clusters after rotation", all)
		close(stop)
		wg.Wait()
		if failed.Load() != 0 || calls.Load() < 10 {
			t.Fatalf("%d of %d calls failed during rotation", failed.Load(), calls.Load())
		}
	})
}

// TestBadCredentialsAreReportedPerCluster checks that unusable credentials show up in
// /debug/clusterz with a precise error and do not disturb the working clusters.
func TestBadCredentialsAreReportedPerCluster(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	kc := func(server, token string, exec bool) string {
		c := clientcmdapi.NewConfig()
		c.Clusters["x"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: env.clusters[1].RESTConfig().CAData}
		c.AuthInfos["x"] = &clientcmdapi.AuthInfo{Token: token}
		if exec {
			c.AuthInfos["x"] = &clientcmdapi.AuthInfo{Exec: &clientcmdapi.ExecConfig{Command: "/bin/true", APIVersion: "client.authentication.k8s.io/v1"}}
		}
		c.Contexts["x"] = &clientcmdapi.Context{Cluster: "x", AuthInfo: "x"}
		c.CurrentContext = "x"
		data, err := clientcmd.Write(*c)
		if err != nil {
			t.Fatal(err)
		}
		return string(data)
	}
	// A token of a service account with no RBAC at all.
	cs := env.clients[1]
	if _, err := cs.CoreV1().ServiceAccounts("default").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "nobody"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	tr, err := cs.CoreV1().ServiceAccounts("default").CreateToken(ctx, "nobody", &authnv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadURL := "https://" + dead.Addr().String()
	dead.Close()
	secret := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "istio-remote-secret-bad", Namespace: "istio-system", Labels: map[string]string{remote.MultiClusterLabel: "true"}},
		StringData: map[string]string{
			"bad-exec":    kc(env.clusters[1].URL, "", true),
			"unreachable": kc(deadURL, "t", false),
			"no-rbac":     kc(env.clusters[1].URL, tr.Status.Token, false),
			// The same cluster ID as a working link: refused, the first undisturbed.
			env.clusters[1].Name: kc(env.clusters[1].URL, tr.Status.Token, false),
		},
	}
	if _, err := env.clients[0].CoreV1().Secrets("istio-system").Create(ctx, secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer env.clients[0].CoreV1().Secrets("istio-system").Delete(ctx, secret.Name, metav1.DeleteOptions{})
	want := map[string]string{
		"bad-exec":    "exec plugin",
		"unreachable": "connect: connection refused",
		"no-rbac":     "forbidden",
	}
	kubetest.Eventually(t, 20*time.Second, "each bad credential reported", func() error {
		cz := clusterz(t)
		for id, msg := range want {
			s, ok := statusOf(cz, id)
			if !ok || !strings.Contains(s.Error, msg) {
				return fmt.Errorf("%s: want error containing %q, have %+v", id, msg, s)
			}
		}
		dup := false
		for _, s := range cz.Clusters {
			if string(s.ID) == env.clusters[1].Name && strings.Contains(s.Error, "duplicate cluster ID") {
				dup = true
			}
		}
		if !dup {
			return fmt.Errorf("duplicate cluster ID not reported: %+v", cz.Clusters)
		}
		return nil
	})
	cz := clusterz(t)
	if s, _ := statusOf(cz, "unreachable"); s.State != primary.StateUnreachable && s.State != primary.StateTimeout {
		t.Errorf("unreachable cluster state %s", s.State)
	}
	for _, c := range env.clusters {
		for _, s := range cz.Clusters {
			if string(s.ID) == c.Name && s.Source != "secret istio-system/istio-remote-secret-bad key "+c.Name && s.State != primary.StateSynced {
				t.Errorf("working cluster %s disturbed: %+v", c.Name, s)
			}
		}
	}
	// The no-rbac cluster never syncs: it holds readiness for at most the sync timeout.
	kubetest.Eventually(t, 5*time.Second+5*time.Second, "readiness despite bad credentials", func() error {
		if cz := clusterz(t); !cz.Ready {
			return fmt.Errorf("not ready: %+v", cz.Clusters)
		}
		return nil
	})
	if s, _ := statusOf(clusterz(t), "no-rbac"); s.State != primary.StateTimeout {
		t.Errorf("a cluster whose token has no RBAC should time out its first sync: %+v", s)
	}
	resp, err := http.Get(env.debug.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"isthmus_primary_cluster_state", "isthmus_primary_pushes_total", "isthmus_primary_connected_proxies", "isthmus_primary_push_duration_seconds"} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metric %s missing", m)
		}
	}
}
