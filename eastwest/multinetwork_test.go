package eastwest_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/xds"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// echo answers with its pod name and the SPIFFE identity of the caller it saw over mTLS.
type echo struct {
	testgrpc.UnimplementedTestServiceServer
	id string
}

func (e *echo) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	caller := "none"
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 && len(ti.State.PeerCertificates[0].URIs) > 0 {
			caller = ti.State.PeerCertificates[0].URIs[0].String()
		}
	}
	return &testgrpc.SimpleResponse{ServerId: e.id, Hostname: caller}, nil
}

// svidFiles issues an identity from ca and returns a TLS certificate for it.
func svid(t *testing.T, ca *trust.Authority, id string) (tls.Certificate, []byte, []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	csr, _ := x509.ParseCertificateRequest(der)
	ident, _ := mesh.ParseIdentity(id)
	chain, err := ca.Sign(context.Background(), csr, ident, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	certPEM := []byte(strings.Join(chain[:len(chain)-1], ""))
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return c, certPEM, keyPEM
}

// TestMultiNetworkThroughGateway is the multi-network end to end: two real clusters on two
// separated networks (network namespaces, no forwarding), a primary per cluster with the
// other's remote secret, an east-west gateway for network-2, certificates from one root.
// A grpc-go proxyless client on network-1 calls a service with pods on both networks; its
// calls to network-2 cross the gateway with end-to-end mTLS and the SNI from xDS.
func TestMultiNetworkThroughGateway(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Networks: n1 and n2 hold each network's pods and clients; gw1 and gw2 hold each
	// network's gateway, attached to both networks. Nothing forwards between interfaces.
	n1, err := netlab.New("n1")
	if errors.Is(err, netlab.ErrNotRoot) {
		t.Skip("needs root for network namespaces (CI runs as root)")
	}
	if err != nil {
		t.Fatal(err)
	}
	defer n1.Close()
	n2, _ := netlab.New("n2")
	defer n2.Close()
	gw2ns, _ := netlab.New("gw2")
	defer gw2ns.Close()
	gw1ns, _ := netlab.New("gw1")
	defer gw1ns.Close()
	gwAddr := netip.MustParseAddr("192.168.12.2")  // network-2's gateway, as seen from network-1
	gw1Addr := netip.MustParseAddr("192.168.21.2") // network-1's gateway, as seen from network-2
	for _, step := range []error{
		netlab.Link(n1, gw2ns, netip.MustParsePrefix("192.168.12.1/24"), netip.PrefixFrom(gwAddr, 24)),
		netlab.Link(gw2ns, n2, netip.MustParsePrefix("10.2.255.1/24"), netip.MustParsePrefix("10.2.255.2/24")),
		gw2ns.Route(netip.MustParsePrefix("10.2.0.0/16"), netip.MustParseAddr("10.2.255.2")),
		netlab.Link(n2, gw1ns, netip.MustParsePrefix("192.168.21.1/24"), netip.PrefixFrom(gw1Addr, 24)),
		netlab.Link(gw1ns, n1, netip.MustParsePrefix("10.1.255.1/24"), netip.MustParsePrefix("10.1.255.2/24")),
		gw1ns.Route(netip.MustParsePrefix("10.1.0.0/16"), netip.MustParseAddr("10.1.255.2")),
		n1.NoForwarding(), n2.NoForwarding(), gw1ns.NoForwarding(), gw2ns.NoForwarding(),
	} {
		if step != nil {
			t.Fatal(step)
		}
	}

	// Trust: one root, an intermediate per cluster.
	root, _ := trust.NewRoot("cluster.local", trust.RootOptions{})
	ca := map[int]*trust.Authority{}
	for i := range 2 {
		ca[i], _ = root.NewIntermediate(trust.IntermediateOptions{Cluster: mesh.ClusterID(fmt.Sprintf("mn-%d", i+1))})
	}
	rootPool := x509.NewCertPool()
	rootPool.AddCert(root.Cert)

	clusters := kubetest.Start(t, 2)
	clients := make([]kubernetes.Interface, 2)
	for i, c := range clusters {
		clients[i], _ = c.Client()
		network := fmt.Sprintf("network-%d", i+1)
		for _, ns := range []string{"istio-system", "demo"} {
			obj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}
			if ns == "istio-system" {
				obj.Labels = map[string]string{primary.LabelNetwork: network}
			}
			if _, err := clients[i].CoreV1().Namespaces().Create(ctx, obj, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		kubetest.Eventually(t, 20*time.Second, "default service account", func() error {
			_, err := clients[i].CoreV1().ServiceAccounts("demo").Get(ctx, "default", metav1.GetOptions{})
			return err
		})
		if _, err := clients[i].CoreV1().Services("demo").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "demo"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"}, Ports: []corev1.ServicePort{{Name: "grpc", Port: 8080, TargetPort: intstr.FromString("grpc")}}}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Each network's gateway, as a Service the primaries discover.
	for i, addr := range []netip.Addr{gw1Addr, gwAddr} {
		if _, err := clients[i].CoreV1().Services("istio-system").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "eastwestgateway", Namespace: "istio-system", Labels: map[string]string{primary.LabelNetwork: fmt.Sprintf("network-%d", i+1)}},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "tls", Port: 15443}}, ExternalIPs: []string{addr.String()}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// Pods: an mTLS echo server per network, inside its network namespace.
	pods := []struct {
		ns   *netlab.Namespace
		ip   string
		name string
	}{{n1, "10.1.0.10", "echo-net1"}, {n2, "10.2.0.10", "echo-net2"}}
	for i, p := range pods {
		cert, _, _ := svid(t, ca[i], "spiffe://cluster.local/ns/demo/sa/echo")
		if err := p.ns.AddAddr(netip.MustParseAddr(p.ip)); err != nil {
			t.Fatal(err)
		}
		l, err := p.ns.Listen(p.ip + ":8080")
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: rootPool, ClientAuth: tls.RequireAndVerifyClientCert})))
		testgrpc.RegisterTestServiceServer(s, &echo{id: p.name})
		go s.Serve(l)
		defer s.Stop()
		if _, err := clients[i].CoreV1().Pods("demo").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "demo",
				Labels:      map[string]string{"app": "echo", primary.LabelTLSMode: primary.TLSModeIstio},
				Annotations: map[string]string{kubelocal.PodIPAnnotation: p.ip}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "echo", Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: 8080}}}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	// A primary per cluster, each with the other's remote secret.
	xdsAddr := make([]string, 2)
	for i, c := range clusters {
		other := 1 - i
		created, err := remote.Create(ctx, clients[other], clusters[other].RESTConfig(), remote.CreateOptions{Cluster: mesh.ClusterID(clusters[other].Name)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := clients[i].CoreV1().Secrets("istio-system").Create(ctx, created.Secret, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p, err := primary.New(primary.Config{ClusterID: mesh.ClusterID(c.Name), LocalClient: clients[i], Debounce: 10 * time.Millisecond, Metrics: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		gs := grpc.NewServer()
		p.RegisterXDS(ctx, gs)
		go gs.Serve(l)
		defer gs.Stop()
		go p.Run(ctx)
		xdsAddr[i] = l.Addr().String()
	}

	// A gateway per network: it listens on the side facing the other network, dials into
	// its own, and takes routes from its own cluster's primary (its network's view).
	routes := []*eastwest.Table{{}, {}}
	gwNS := []*netlab.Namespace{gw1ns, gw2ns}
	gwListen := []netip.Addr{gw1Addr, gwAddr}
	for i := range 2 {
		conn, _ := grpc.NewClient(xdsAddr[i], grpc.WithTransportCredentials(insecure.NewCredentials()))
		defer conn.Close()
		go eastwest.WatchRoutes(ctx, eastwest.XDSConfig{Conn: conn, Network: mesh.NetworkID(fmt.Sprintf("network-%d", i+1)), Cluster: mesh.ClusterID(clusters[i].Name)}, routes[i])
	}
	startGateway := func(i int) *eastwest.Gateway {
		gw, err := eastwest.New(eastwest.Config{Routes: routes[i], Metrics: prometheus.NewRegistry(),
			Dial: func(ctx context.Context, a netip.AddrPort) (net.Conn, error) { return gwNS[i].Dial(ctx, a.String()) }})
		if err != nil {
			t.Fatal(err)
		}
		l, err := gwNS[i].Listen(gwListen[i].String() + ":15443")
		if err != nil {
			t.Fatal(err)
		}
		go gw.Serve(l)
		return gw
	}
	gw1 := startGateway(0)
	defer func() {
		sctx, scancel := context.WithTimeout(context.Background(), time.Second)
		defer scancel()
		gw1.Shutdown(sctx)
	}()
	gw := startGateway(1)

	// Clients: grpc-go's proxyless xDS client with mTLS from a file_watcher provider, one
	// per network, each talking to its own cluster's primary.
	newClient := func(i int, ns *netlab.Namespace) testgrpc.TestServiceClient {
		dir := t.TempDir()
		_, certPEM, keyPEM := svid(t, ca[i], fmt.Sprintf("spiffe://cluster.local/ns/demo/sa/client-%d", i+1))
		os.WriteFile(filepath.Join(dir, "cert.pem"), certPEM, 0o600)
		os.WriteFile(filepath.Join(dir, "key.pem"), keyPEM, 0o600)
		os.WriteFile(filepath.Join(dir, "root.pem"), root.RootPEM(), 0o600)
		bootstrap := fmt.Sprintf(`{
		  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
		  "node": {"id": "sidecar~10.%d.0.99~client.demo~demo.svc.cluster.local", "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q, "NETWORK": "network-%d"}},
		  "certificate_providers": {%q: {"plugin_name": "file_watcher", "config": {
		     "certificate_file": %q, "private_key_file": %q, "ca_certificate_file": %q, "refresh_interval": "10s"}}}
		}`, xdsAddr[i], i+1, clusters[i].Name, i+1, mesh.CertProviderInstance,
			filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root.pem"))
		rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
		if err != nil {
			t.Fatal(err)
		}
		creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
		if err != nil {
			t.Fatal(err)
		}
		cc, err := grpc.NewClient("xds:///echo.demo.svc.cluster.local:8080", grpc.WithTransportCredentials(creds), grpc.WithResolvers(rb),
			grpc.WithContextDialer(ns.Dial))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		return testgrpc.NewTestServiceClient(cc)
	}
	callWith := func(client testgrpc.TestServiceClient, n int) (map[string]string, int) {
		got, failed := map[string]string{}, 0
		for range n {
			cctx, ccancel := context.WithTimeout(ctx, 2*time.Second)
			r, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{})
			ccancel()
			if err != nil {
				failed++
				continue
			}
			got[r.ServerId] = r.Hostname
		}
		return got, failed
	}
	client := newClient(0, n1)
	call := func(n int) (map[string]string, int) { return callWith(client, n) }
	kubetest.Eventually(t, 60*time.Second, "answers from both networks", func() error {
		got, _ := call(20)
		if len(got) != 2 {
			return fmt.Errorf("answers: %v", got)
		}
		return nil
	})
	got, _ := call(20)
	if got["echo-net2"] != "spiffe://cluster.local/ns/demo/sa/client-1" {
		t.Fatalf("network-2's pod saw caller %q; want the client's SPIFFE identity end to end", got["echo-net2"])
	}
	// The other direction, through network-1's gateway.
	client2 := newClient(1, n2)
	kubetest.Eventually(t, 60*time.Second, "answers from both networks for a network-2 client", func() error {
		got, _ := callWith(client2, 20)
		if len(got) != 2 || got["echo-net1"] != "spiffe://cluster.local/ns/demo/sa/client-2" {
			return fmt.Errorf("answers: %v", got)
		}
		return nil
	})

	// The networks are really separate: network-2's pod is unreachable from network-1.
	dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
	if c, err := n1.Dial(dctx, "10.2.0.10:8080"); err == nil {
		c.Close()
		t.Fatal("network-1 reached a network-2 pod directly")
	}
	dcancel()

	// Killing the gateway breaks network-2, not network-1; a new one restores it.
	sctx, scancel := context.WithCancel(ctx)
	scancel()
	gw.Shutdown(sctx)
	// gRPC's round robin moves every call to network-1 (failover), so what shows is that
	// network-2 stops answering while network-1 keeps serving, and the gateway's address
	// refuses connections.
	kubetest.Eventually(t, 30*time.Second, "network-2 unreachable without its gateway", func() error {
		got, failed := call(20)
		if _, ok := got["echo-net1"]; !ok || failed == 20 {
			return fmt.Errorf("network-1 must keep working: answers %v, %d failed", got, failed)
		}
		if _, ok := got["echo-net2"]; ok {
			return errors.New("network-2 still answered")
		}
		return nil
	})
	dctx, dcancel = context.WithTimeout(ctx, 2*time.Second)
	if c, err := n1.Dial(dctx, gwAddr.String()+":15443"); err == nil {
		c.Close()
		t.Fatal("the stopped gateway still accepted connections")
	}
	dcancel()
	gw = startGateway(1)
	defer func() {
		// The client's connections through the gateway are still open here: drain briefly,
		// then close them.
		sctx, scancel := context.WithTimeout(context.Background(), time.Second)
		defer scancel()
		gw.Shutdown(sctx)
	}()
	kubetest.Eventually(t, 60*time.Second, "network-2 back with a new gateway", func() error {
		if got, _ := call(20); len(got) != 2 {
			return fmt.Errorf("answers: %v", got)
		}
		return nil
	})
}
