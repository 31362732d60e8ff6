package primary_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	apinet "istio.io/api/networking/v1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// The policies under test, as a user writes them: geo fails over from region r1 to r2
// when outlier detection ejects r1's pod, ring hashes on x-user, and its "limited"
// subset admits one request at a time.
const (
	policyPort = 9090
	geoDR      = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: geo, namespace: policy}
spec:
  host: geo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 100}
    loadBalancer:
      localityLbSetting: {failover: [{from: r1, to: r2}]}
`
	ringDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ring, namespace: policy}
spec:
  host: ring
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  subsets:
  - name: limited
    labels: {app: ring}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      connectionPool: {http: {http2MaxRequests: 1}}
`
	ringVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ring, namespace: policy}
spec:
  hosts: [ring]
  http:
  - match:
    - headers: {x-test: {exact: limited}}
    route:
    - destination: {host: ring, subset: limited}
  - route:
    - destination: {host: ring}
`
)

// toggleServer answers with its id, after the request's "sleep-ms", or fails every call
// with Unavailable while fail is set.
type toggleServer struct {
	testgrpc.UnimplementedTestServiceServer
	id   string
	fail atomic.Bool
}

func (s *toggleServer) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if s.fail.Load() {
		return nil, status.Error(codes.Unavailable, "this pod is failing")
	}
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("sleep-ms")) > 0 {
		ms, _ := strconv.Atoi(md.Get("sleep-ms")[0])
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return &testgrpc.SimpleResponse{ServerId: s.id}, nil
}

// addPolicyPod starts a toggleServer for app in cluster i and registers its Pod.
func addPolicyPod(t *testing.T, i int, app, name, ip string) *toggleServer {
	t.Helper()
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(policyPort)))
	if err != nil {
		t.Fatal(err)
	}
	srv := &toggleServer{id: name}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, srv)
	go s.Serve(lis)
	env.servers.Store(ip, s)
	_, err = env.clients[i].CoreV1().Pods("policy").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "policy", Labels: map[string]string{"app": app},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: app, Image: app, Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: policyPort}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// policyNamespace creates namespace policy in cluster i.
func policyNamespace(t *testing.T, i int) {
	t.Helper()
	ctx := context.Background()
	cs := env.clients[i]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "policy"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "default service account in policy", func() error {
		_, err := cs.CoreV1().ServiceAccounts("policy").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
}

// policyService creates namespace policy and Service app in cluster i.
func policyService(t *testing.T, i int, app string) {
	t.Helper()
	policyNamespace(t, i)
	if _, err := env.clients[i].CoreV1().Services("policy").Create(context.Background(), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: "policy"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: policyPort, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
}

// labelRegion puts cluster i's node in region.
func labelRegion(t *testing.T, i int, region string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, corev1.LabelTopologyRegion, region)
	if _, err := env.clients[i].CoreV1().Nodes().Patch(context.Background(), env.clusters[i].NodeName, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

// dialPolicy dials app with a proxyless client whose node is in region.
func dialPolicy(t *testing.T, app, region string) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~127.0.0.1~policy-client-%d.policy~policy.svc.cluster.local",
	           "locality": {"region": %q},
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q}}
	}`, env.xdsAddr, time.Now().UnixNano(), region, env.clusters[0].Name)
	rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s.policy.svc.cluster.local:%d", app, policyPort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// callPolicy makes one call with the metadata pairs kv and returns the answering pod ("" on
// failure) and the error.
func callPolicy(c testgrpc.TestServiceClient, kv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := c.UnaryCall(metadata.AppendToOutgoingContext(ctx, kv...), &testgrpc.SimpleRequest{FillServerId: true})
	if err != nil {
		return "", err
	}
	return r.ServerId, nil
}

// TestTrafficPolicies applies DestinationRules through the API server and measures from
// real proxyless clients: locality failover driven by outlier detection (calls stay in
// the caller's region, move to the other cluster when its pod fails, and come back when
// it heals), consistent hashing on a header, and circuit breaking on max requests.
func TestTrafficPolicies(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	linkCluster(t, 1)
	labelRegion(t, 0, "r1")
	labelRegion(t, 1, "r2")
	for i := range 2 {
		policyService(t, i, "geo")
	}
	policyService(t, 0, "ring")
	r1 := addPolicyPod(t, 0, "geo", "geo-r1", "10.99.60.1")
	addPolicyPod(t, 1, "geo", "geo-r2", "10.99.60.2")
	for i := range 3 {
		addPolicyPod(t, 0, "ring", fmt.Sprintf("ring-%d", i), fmt.Sprintf("10.99.60.%d", 10+i))
	}
	for _, y := range []string{geoDR, ringDR} {
		dr := &networkingv1.DestinationRule{}
		if err := yaml.Unmarshal([]byte(y), dr); err != nil {
			t.Fatal(err)
		}
		if _, err := env.istio.NetworkingV1().DestinationRules("policy").Create(ctx, dr, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vs := &networkingv1.VirtualService{}
	if err := yaml.Unmarshal([]byte(ringVS), vs); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().VirtualServices("policy").Create(ctx, vs, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	t.Run("locality failover and back", func(t *testing.T) {
		c := dialPolicy(t, "geo", "r1")
		kubetest.Eventually(t, 30*time.Second, "every call answered in the caller's region r1", func() error {
			got := map[string]int{}
			for range 40 {
				id, _ := callPolicy(c)
				got[id]++
			}
			if got["geo-r1"] != 40 {
				return fmt.Errorf("answers %v", got)
			}
			return nil
		})
		// r1's pod starts failing: outlier detection must eject it within an interval
		// (1 s) and the client move to r2, the next priority.
		r1.fail.Store(true)
		start := time.Now()
		failed, moved := 0, time.Duration(0)
		for streak := 0; streak < 20; {
			if time.Since(start) > 20*time.Second {
				t.Fatalf("calls never moved to r2 (%d failed)", failed)
			}
			id, err := callPolicy(c)
			switch {
			case err != nil:
				failed++
				streak = 0
			case id == "geo-r2":
				if streak == 0 {
					moved = time.Since(start)
				}
				streak++
			default:
				t.Fatalf("a failing pod answered: %q", id)
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("failover: calls moved to r2 %s after r1 began failing (%d calls failed meanwhile)", moved.Round(time.Millisecond), failed)
		if moved > 5*time.Second {
			t.Errorf("failover took %s; want within the 1 s interval plus ejection and switching (under 5 s)", moved)
		}
		// While r1 is ejected, calls stay on r2 without failures.
		for range 50 {
			if id, err := callPolicy(c); err != nil || id != "geo-r2" {
				t.Fatalf("after failover: %q %v", id, err)
			}
		}
		// r1 heals: after the 3 s ejection, calls come back to the caller's region.
		r1.fail.Store(false)
		healed := time.Now()
		for {
			if time.Since(healed) > 30*time.Second {
				t.Fatal("calls never came back to r1")
			}
			id, err := callPolicy(c)
			if err == nil && id == "geo-r1" {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		back := time.Since(healed)
		t.Logf("failback: calls back in r1 %s after it healed (ejection 3 s)", back.Round(time.Millisecond))
		got := map[string]int{}
		for range 40 {
			id, _ := callPolicy(c)
			got[id]++
		}
		if got["geo-r1"] != 40 {
			t.Fatalf("after failback: %v", got)
		}
	})

	t.Run("consistent hash on a header", func(t *testing.T) {
		c := dialPolicy(t, "ring", "r1")
		kubetest.Eventually(t, 30*time.Second, "three ring pods answering", func() error {
			pods := map[string]bool{}
			for u := range 30 {
				id, err := callPolicy(c, "x-user", fmt.Sprintf("user-%d", u))
				if err != nil {
					return err
				}
				pods[id] = true
			}
			if len(pods) < 2 {
				return fmt.Errorf("30 users all hashed to %v", pods)
			}
			return nil
		})
		pods := map[string]bool{}
		for u := range 20 {
			user := fmt.Sprintf("user-%d", u)
			first := ""
			for range 10 {
				id, err := callPolicy(c, "x-user", user)
				if err != nil {
					t.Fatal(err)
				}
				if first == "" {
					first = id
				}
				if id != first {
					t.Fatalf("%s answered by %s and %s: the hash must pin a user to one pod", user, first, id)
				}
			}
			pods[first] = true
		}
		t.Logf("20 users × 10 calls: each user on one pod, %d pods used", len(pods))
	})

	t.Run("circuit breaking on max requests", func(t *testing.T) {
		c := dialPolicy(t, "ring", "r1")
		kubetest.Eventually(t, 30*time.Second, "the limited subset answering", func() error {
			_, err := callPolicy(c, "x-test", "limited")
			return err
		})
		for range 20 { // one at a time is within the limit
			if _, err := callPolicy(c, "x-test", "limited"); err != nil {
				t.Fatalf("sequential call: %v", err)
			}
		}
		var wg sync.WaitGroup
		var ok, tripped, other atomic.Int32
		for range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := callPolicy(c, "x-test", "limited", "sleep-ms", "500")
				switch status.Code(err) {
				case codes.OK:
					ok.Add(1)
				case codes.Unavailable:
					tripped.Add(1)
				default:
					other.Add(1)
				}
			}()
		}
		wg.Wait()
		t.Logf("10 concurrent calls with max requests 1: %d answered, %d refused by the circuit breaker", ok.Load(), tripped.Load())
		if ok.Load() < 1 || tripped.Load() < 5 || other.Load() > 0 {
			t.Fatalf("%d answered, %d Unavailable, %d other; want at least 1 answered and most refused", ok.Load(), tripped.Load(), other.Load())
		}
		// The same calls on the unlimited default route all succeed.
		var wg2 sync.WaitGroup
		var fails atomic.Int32
		for range 10 {
			wg2.Add(1)
			go func() {
				defer wg2.Done()
				if _, err := callPolicy(c, "x-user", "u", "sleep-ms", "200"); err != nil {
					fails.Add(1)
				}
			}()
		}
		wg2.Wait()
		if fails.Load() > 0 {
			t.Fatalf("%d of 10 concurrent calls failed without a limit", fails.Load())
		}
	})
}

// An entry for a VM inside the mesh (a plain server in the pods' network stands for it),
// and one the primary must refuse (resolution NONE).
const (
	vmEntry = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ledger, namespace: policy}
spec:
  hosts: [ledger.vm.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 9090, name: grpc, protocol: GRPC}
  endpoints:
  - {address: 10.99.60.20, labels: {version: v1}}
`
	passthroughEntry = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: policy}
spec:
  hosts: [anything.example.com]
  ports:
  - {number: 443, name: tls, protocol: TLS}
`
)

// TestServiceEntryReachable applies ServiceEntries through the API server: a real
// proxyless client reaches the static endpoint of one by its host name, a second
// endpoint added to the entry starts answering, and the entry the primary cannot serve
// is refused on configz with an Event, while the first keeps working.
func TestServiceEntryReachable(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	policyNamespace(t, 0)
	for i, ip := range []string{"10.99.60.20", "10.99.60.21"} {
		if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
			t.Fatal(err)
		}
		lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(policyPort)))
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer()
		testgrpc.RegisterTestServiceServer(s, &toggleServer{id: fmt.Sprintf("vm-%d", i+1)})
		go s.Serve(lis)
		env.servers.Store(ip, s)
	}
	ses := env.istio.NetworkingV1().ServiceEntries("policy")
	for _, y := range []string{vmEntry, passthroughEntry} {
		se := &networkingv1.ServiceEntry{}
		if err := yaml.Unmarshal([]byte(y), se); err != nil {
			t.Fatal(err)
		}
		if _, err := ses.Create(ctx, se, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	c := dialHost(t, "ledger.vm.internal")
	kubetest.Eventually(t, 30*time.Second, "the VM answering by its entry's host name", func() error {
		id, err := callPolicy(c)
		if id != "vm-1" {
			return fmt.Errorf("answer %q, %v", id, err)
		}
		return nil
	})
	kubetest.Eventually(t, 20*time.Second, "configz: ledger applied, passthrough refused", func() error {
		want := map[string]string{"ledger": "", "passthrough": "unsupported"}
		for _, o := range configz(t).Objects {
			if r, ok := want[o.Name]; ok && o.Kind == "ServiceEntry" && o.Applied == (r == "") && o.Reason == r {
				delete(want, o.Name)
			}
		}
		if len(want) > 0 {
			return fmt.Errorf("still waiting for %v", want)
		}
		return nil
	})
	kubetest.Eventually(t, 10*time.Second, "a Warning event on the refused entry", func() error {
		evs, err := env.clients[0].CoreV1().Events("policy").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=passthrough"})
		if err != nil {
			return err
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && e.InvolvedObject.Kind == "ServiceEntry" {
				return nil
			}
		}
		return fmt.Errorf("events: %+v", evs.Items)
	})
	cur, err := ses.Get(ctx, "ledger", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Endpoints = append(cur.Spec.Endpoints, &apinet.WorkloadEntry{Address: "10.99.60.21"})
	if _, err := ses.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "both endpoints of the updated entry answering", func() error {
		got := map[string]int{}
		for range 20 {
			id, _ := callPolicy(c)
			got[id]++
		}
		if got["vm-1"] == 0 || got["vm-2"] == 0 || got[""] > 0 {
			return fmt.Errorf("answers %v", got)
		}
		return nil
	})
	if err := ses.Delete(ctx, "ledger", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "the deleted entry's host gone", func() error {
		if _, err := callPolicy(c); err == nil {
			return fmt.Errorf("still answered")
		}
		return nil
	})
}

// dialHost dials host:9090 with a proxyless client.
func dialHost(t *testing.T, host string) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~127.0.0.1~entry-client-%d.policy~policy.svc.cluster.local",
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q}}
	}`, env.xdsAddr, time.Now().UnixNano(), env.clusters[0].Name)
	rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:%d", host, policyPort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}
