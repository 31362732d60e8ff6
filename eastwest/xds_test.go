package eastwest_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// TestRoutesFromPrimary runs a primary on a real cluster with pods on two networks and
// checks that a gateway on network net-2 learns exactly net-2's endpoints over ADS, and
// keeps them when the primary goes away.
func TestRoutesFromPrimary(t *testing.T) {
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
	must(cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, metav1.CreateOptions{}))
	kubetest.Eventually(t, 20*time.Second, "the default service account", func() error {
		_, err := cs.CoreV1().ServiceAccounts("demo").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	must(cs.CoreV1().Services("demo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080, TargetPort: intstr.FromString("grpc")}}}}, metav1.CreateOptions{}))
	for name, pod := range map[string]struct{ ip, network string }{"n1": {"10.1.0.5", "net-1"}, "n2": {"10.2.0.5", "net-2"}} {
		must(cs.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "demo",
				Labels:      map[string]string{"app": "echo", primary.LabelNetwork: pod.network, primary.LabelTLSMode: primary.TLSModeIstio},
				Annotations: map[string]string{kubelocal.PodIPAnnotation: pod.ip}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "echo", Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: 8080}}}}},
		}, metav1.CreateOptions{}))
	}

	p, err := primary.New(primary.Config{ClusterID: "c1", LocalClient: cs, Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	gs := grpc.NewServer()
	pctx, pcancel := context.WithCancel(ctx)
	p.RegisterXDS(pctx, gs)
	go gs.Serve(l)
	go p.Run(pctx)

	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	table := &eastwest.Table{}
	go eastwest.WatchRoutes(ctx, eastwest.XDSConfig{Conn: conn, Network: "net-2", Cluster: "c1"}, table)
	name := mesh.OutboundName{Port: 8080, Host: "echo.demo.svc.cluster.local"}
	want := []netip.AddrPort{netip.MustParseAddrPort("10.2.0.5:8080")}
	kubetest.Eventually(t, 20*time.Second, "net-2's routes only", func() error {
		if got := table.Endpoints(name); !slices.Equal(got, want) {
			return fmt.Errorf("gateway routes for %s: %v; want %v", name.ClusterName(), got, want)
		}
		return nil
	})
	// The control plane goes away; once the gateway's stream has broken, it still routes
	// with what it had.
	pcancel()
	gs.Stop()
	kubetest.Eventually(t, 10*time.Second, "the xDS connection to break", func() error {
		if s := conn.GetState(); s == connectivity.Ready {
			return fmt.Errorf("connection still %s", s)
		}
		return nil
	})
	if !slices.Equal(table.Endpoints(name), want) {
		t.Fatalf("routes lost with the primary: %v", table.Endpoints(name))
	}
}
