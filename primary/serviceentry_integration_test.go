package primary_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// testDNS is an authoritative DNS server on loopback UDP that answers A queries from a
// table the tests change, and NXDOMAIN for every other name: the primary's resolver in
// these tests asks only it, so nothing is resolved off the machine.
type testDNS struct {
	conn *net.UDPConn
	mu   sync.Mutex
	a    map[string][]netip.Addr // by lower-case name with the trailing dot
}

// startTestDNS listens on 127.0.0.1 and serves until Close.
func startTestDNS() (*testDNS, error) {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	d := &testDNS{conn: c, a: map[string][]netip.Addr{}}
	go d.serve()
	return d, nil
}

// Resolver returns a resolver that sends every query to d.
func (d *testDNS) Resolver() *net.Resolver {
	addr := d.conn.LocalAddr().String()
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dl net.Dialer
		return dl.DialContext(ctx, "udp", addr)
	}}
}

// Set makes name resolve to addrs (none: NXDOMAIN).
func (d *testDNS) Set(name string, addrs ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var list []netip.Addr
	for _, a := range addrs {
		list = append(list, netip.MustParseAddr(a))
	}
	d.a[name+"."] = list
}

func (d *testDNS) Close() { d.conn.Close() }

func (d *testDNS) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := d.conn.ReadFromUDP(buf)
		if err != nil {
			return
		}
		var p dnsmessage.Parser
		h, err := p.Start(buf[:n])
		if err != nil {
			continue
		}
		q, err := p.Question()
		if err != nil {
			continue
		}
		d.mu.Lock()
		addrs, known := d.a[q.Name.String()]
		d.mu.Unlock()
		rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true}
		if !known || len(addrs) == 0 {
			rh.RCode = dnsmessage.RCodeNameError
		}
		b := dnsmessage.NewBuilder(nil, rh)
		b.EnableCompression()
		_ = b.StartQuestions()
		_ = b.Question(q)
		_ = b.StartAnswers()
		for _, a := range addrs {
			if q.Type == dnsmessage.TypeA && a.Is4() {
				_ = b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 1}, dnsmessage.AResource{A: a.As4()})
			}
		}
		if msg, err := b.Finish(); err == nil {
			_, _ = d.conn.WriteToUDP(msg, from)
		}
	}
}

const (
	dnsEntryYAML = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: warehouse, namespace: policy}
spec:
  hosts: [warehouse.example.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 9090, name: grpc, protocol: GRPC}]
`
	selectorEntryYAML = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: policy}
spec:
  hosts: [legacy.policy.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9090, name: grpc, protocol: GRPC}]
  workloadSelector: {labels: {app: legacy}}
`
)

// startEcho serves a toggleServer with id on ip:9090 in the pods' namespace.
func startEcho(t *testing.T, id, ip string) {
	t.Helper()
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(policyPort)))
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, &toggleServer{id: id})
	go s.Serve(lis)
	env.servers.Store(ip, s)
}

// answering calls c 20 times and returns the answers by server ID ("" for failures).
func answering(c testgrpc.TestServiceClient) map[string]int {
	got := map[string]int{}
	for range 20 {
		id, _ := callPolicy(c)
		got[id]++
	}
	return got
}

// TestServiceEntryDNSAndWorkloadSelector applies ServiceEntries through the API server
// and measures from a real proxyless client: a resolution-DNS entry's host answers from
// the address the primary resolved (through a DNS server on loopback), follows the DNS
// answer when it changes, and loses its endpoint on NXDOMAIN; a workloadSelector entry's
// host answers from pods labelled for it in two clusters, and a pod relabelled out of
// the selector stops answering.
func TestServiceEntryDNSAndWorkloadSelector(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	linkCluster(t, 1)
	policyNamespace(t, 0)
	policyNamespace(t, 1)
	startEcho(t, "wh-1", "10.99.61.1")
	startEcho(t, "wh-2", "10.99.61.2")
	env.dns.Set("warehouse.example.test", "10.99.61.1")
	ses := env.istio.NetworkingV1().ServiceEntries("policy")
	for _, y := range []string{dnsEntryYAML, selectorEntryYAML} {
		se := &networkingv1.ServiceEntry{}
		if err := yaml.Unmarshal([]byte(y), se); err != nil {
			t.Fatal(err)
		}
		if _, err := ses.Create(ctx, se, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, n := range []string{"warehouse", "legacy"} {
			_ = ses.Delete(context.Background(), n, metav1.DeleteOptions{})
		}
	})

	t.Run("DNS", func(t *testing.T) {
		c := dialHost(t, "warehouse.example.test")
		kubetest.Eventually(t, 30*time.Second, "the resolved address answering", func() error {
			if got := answering(c); got["wh-1"] != 20 {
				return fmt.Errorf("answers %v", got)
			}
			return nil
		})
		env.dns.Set("warehouse.example.test", "10.99.61.2")
		start := time.Now()
		kubetest.Eventually(t, 30*time.Second, "the new DNS answer answering", func() error {
			if got := answering(c); got["wh-2"] != 20 {
				return fmt.Errorf("answers %v", got)
			}
			return nil
		})
		t.Logf("DNS change reached the client in %s (refresh %s)", time.Since(start).Round(10*time.Millisecond), dnsRefresh)
		env.dns.Set("warehouse.example.test")
		kubetest.Eventually(t, 30*time.Second, "NXDOMAIN removing the endpoint", func() error {
			if _, err := callPolicy(c); err == nil {
				return fmt.Errorf("still answered")
			}
			return nil
		})
	})

	t.Run("workloadSelector", func(t *testing.T) {
		addPolicyPod(t, 0, "legacy", "legacy-c1", "10.99.61.10")
		addPolicyPod(t, 1, "legacy", "legacy-c2", "10.99.61.11")
		addPolicyPod(t, 1, "other", "other-c2", "10.99.61.12")
		c := dialHost(t, "legacy.policy.internal")
		kubetest.Eventually(t, 30*time.Second, "pods of both clusters answering", func() error {
			if got := answering(c); got["legacy-c1"] == 0 || got["legacy-c2"] == 0 || got["other-c2"] > 0 || got[""] > 0 {
				return fmt.Errorf("answers %v", got)
			}
			return nil
		})
		pods := env.clients[1].CoreV1().Pods("policy")
		p, err := pods.Get(ctx, "legacy-c2", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p.Labels = map[string]string{"app": "retired"}
		if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		kubetest.Eventually(t, 30*time.Second, "the relabelled pod gone", func() error {
			if got := answering(c); got["legacy-c1"] != 20 {
				return fmt.Errorf("answers %v", got)
			}
			return nil
		})
	})
}
