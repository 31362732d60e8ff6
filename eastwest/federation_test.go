package eastwest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// TestFederationRoutesExportsOnly runs a primary on a real cluster with two services on
// one pod, exports one of them to peer meshes, and checks a real gateway fed over ADS: on
// its peer listener the exported service's federation name reaches the pod, while the
// other service's federation name and a local cluster.local name are refused as
// not_exported (the in-mesh listener still routes the local name); unexporting removes
// the route from the peer listener within seconds.
func TestFederationRoutesExportsOnly(t *testing.T) {
	c := kubetest.Start(t, 1)[0]
	cs, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// The pod's address is only a name here: the gateway's dialer sends it to a TLS
	// server on loopback standing in for the pod (nothing dials 10.1.0.5 itself).
	server, _ := backend(t)
	pod := netip.MustParseAddrPort("10.1.0.5:8443")
	must(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}))
	kubetest.Eventually(t, 20*time.Second, "the default service account", func() error {
		_, err := cs.CoreV1().ServiceAccounts("demo").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	for _, name := range []string{"echo", "secret"} {
		must(cs.CoreV1().Services("demo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{{Name: "tls", Port: 8080, TargetPort: intstr.FromString("tls")}}}}, metav1.CreateOptions{}))
	}
	must(cs.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo",
			Labels:      map[string]string{"app": "echo", primary.LabelNetwork: "net-1", primary.LabelTLSMode: primary.TLSModeIstio},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: pod.Addr().String()}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "echo", Ports: []corev1.ContainerPort{{Name: "tls", ContainerPort: int32(pod.Port())}}}}},
	}, metav1.CreateOptions{}))

	p, err := primary.New(primary.Config{ClusterID: "c1", LocalClient: cs, Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	exported := primary.FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{{Namespace: "demo", Name: "echo"}: {8080}}}
	p.Registry().SetFederationExports(exported)
	xl, _ := net.Listen("tcp", "127.0.0.1:0")
	gs := grpc.NewServer()
	defer gs.Stop()
	p.RegisterXDS(ctx, gs)
	go gs.Serve(xl)
	go p.Run(ctx)
	conn, err := grpc.NewClient(xl.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	table := &Table{}
	go WatchRoutes(ctx, XDSConfig{Conn: conn, Network: "net-1", Cluster: "c1"}, table)

	reg := prometheus.NewRegistry()
	gw, err := New(Config{Routes: table, Metrics: reg, Dial: func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		if a != pod {
			return nil, fmt.Errorf("dial %s: not the pod", a)
		}
		var d net.Dialer
		return d.DialContext(ctx, "tcp", server.String())
	}})
	if err != nil {
		t.Fatal(err)
	}
	mlis, _ := net.Listen("tcp", "127.0.0.1:0") // in-mesh
	plis, _ := net.Listen("tcp", "127.0.0.1:0") // peers
	go gw.Serve(mlis)
	go gw.ServePeers(plis)
	defer func() {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		gw.Shutdown(sctx)
	}()

	// call says hello through the gateway at addr with server name sni and returns what
	// the pod answered, or the error of a refused connection.
	call := func(addr, sni string) (string, error) {
		tc, err := dialTLS(t, addr, sni, nil)
		if err != nil {
			return "", err
		}
		defer tc.Close()
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(tc, "hi\n"); err != nil {
			return "", err
		}
		return bufio.NewReader(tc).ReadString('\n')
	}
	echoFed := "outbound_.8080_._.echo.demo.svc.mesh-a.isthmus"
	kubetest.Eventually(t, 20*time.Second, "the exported service routed to peers", func() error {
		got, err := call(plis.Addr().String(), echoFed)
		if err != nil {
			return err
		}
		if want := "sni=" + echoFed + " echo=hi\n"; got != want {
			return fmt.Errorf("pod answered %q; want %q", got, want)
		}
		return nil
	})
	refused := func(sni string) {
		t.Helper()
		before := testutil.ToFloat64(gw.total.WithLabelValues(ResultNotExported))
		if got, err := call(plis.Addr().String(), sni); err == nil {
			t.Fatalf("peer listener routed %s: %q", sni, got)
		}
		if n := testutil.ToFloat64(gw.total.WithLabelValues(ResultNotExported)); n != before+1 {
			t.Fatalf("%s: not_exported %v, want %v", sni, n, before+1)
		}
	}
	refused("outbound_.8080_._.secret.demo.svc.mesh-a.isthmus") // not exported
	refused("outbound_.8080_._.secret.demo.svc.cluster.local")  // a local name
	refused("outbound_.8080_._.echo.demo.svc.cluster.local")    // the exported one, but by its local name
	refused("outbound_.8081_._.echo.demo.svc.mesh-a.isthmus")   // a port that is not exported
	refused("outbound_.8080_.v1_.echo.demo.svc.mesh-a.isthmus") // a subset
	if got, err := call(mlis.Addr().String(), "outbound_.8080_._.secret.demo.svc.cluster.local"); err != nil || !strings.HasPrefix(got, "sni=") {
		t.Fatalf("in-mesh listener: %q, %v", got, err)
	}

	// Unexport: the federation name leaves the peer listener.
	start := time.Now()
	p.Registry().SetFederationExports(primary.FederationExports{Mesh: "mesh-a"})
	kubetest.Eventually(t, 10*time.Second, "the unexported service refused", func() error {
		if got, err := call(plis.Addr().String(), echoFed); err == nil {
			return fmt.Errorf("still routed: %q", got)
		}
		return nil
	})
	t.Logf("unexport to refusal at the gateway: %v", time.Since(start))
	refused(echoFed)
}
