package primary_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/primary"
)

const (
	reviewsHost = "reviews.traffic.svc.cluster.local"
	reviewsPort = 9080
)

// The configuration under test, as a user writes it: a 90/10 split between v1 and v2,
// and the signed-in user "jason" always on v2 (Istio's request-routing task, written
// anew); v3 has a failing pod, hidden by retries on one route and not on another; a
// route with a 300 ms timeout; routes with an injected abort and delay; plus a VirtualService naming a subset no rule defines, which must be refused
// alone.
const (
	trafficDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: traffic}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}} # grpc-go NACKs policies it lacks
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  # Round robin, so that a retry always goes to the other v3 pod (with least request's two
  # random choices, four attempts can all land on the failing pod: 1 call in 16).
  - {name: v3, labels: {version: v3}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
`
	trafficVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: traffic}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - match:
    - headers: {x-test: {exact: retry}}
    route:
    - destination: {host: reviews, subset: v3}
    retries: {attempts: 3, retryOn: unavailable}
  - match:
    - headers: {x-test: {exact: noretry}}
    route:
    - destination: {host: reviews, subset: v3}
  - match:
    - headers: {x-test: {exact: slow}}
    route:
    - destination: {host: reviews, subset: v1}
    timeout: 300ms
  - match:
    - headers: {x-test: {exact: abort}}
    fault: {abort: {grpcStatus: UNAVAILABLE}}
    route:
    - destination: {host: reviews, subset: v1}
  - match:
    - headers: {x-test: {exact: delay}}
    fault: {delay: {fixedDelay: 400ms, percentage: {value: 100}}}
    route:
    - destination: {host: reviews, subset: v1}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v2}
      weight: 10
`
	trafficBadVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-typo, namespace: traffic}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
`
)

// reviewsServer answers with its id, after sleeping for the request's "sleep-ms"
// metadata (bounded by the call's deadline); a failing one answers Unavailable.
type reviewsServer struct {
	testgrpc.UnimplementedTestServiceServer
	id   string
	fail bool
}

func (s *reviewsServer) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if s.fail {
		return nil, status.Error(codes.Unavailable, "this pod fails every call")
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

// addVersionPod starts a reviews server (answering id) and registers its Pod, labelled
// with version.
func addVersionPod(t *testing.T, name, version, id, ip string, fail bool) {
	t.Helper()
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(reviewsPort)))
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(s, &reviewsServer{id: id, fail: fail})
	go s.Serve(lis)
	env.servers.Store(ip, s)
	_, err = env.clients[0].CoreV1().Pods("traffic").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "traffic", Labels: map[string]string{"app": "reviews", "version": version},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "reviews", Image: "reviews", Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: reviewsPort}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

// dialReviews dials reviews with grpc-go's proxyless xDS client through the primary.
func dialReviews(t *testing.T) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": "sidecar~127.0.0.1~traffic-client-%d.traffic~traffic.svc.cluster.local",
	           "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q}}
	}`, env.xdsAddr, time.Now().UnixNano(), env.clusters[0].Name)
	rb, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:%d", reviewsHost, reviewsPort),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// callVersions makes n calls as user (none when empty) and counts the answering versions.
func callVersions(c testgrpc.TestServiceClient, n int, user string) (map[string]int, int) {
	if user == "" {
		return callWith(c, n)
	}
	return callWith(c, n, "end-user", user)
}

// callWith makes n calls carrying the metadata key/value pairs kv and counts the answers
// by server id, and the failures.
func callWith(c testgrpc.TestServiceClient, n int, kv ...string) (map[string]int, int) {
	got, failed := map[string]int{}, 0
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		ctx = metadata.AppendToOutgoingContext(ctx, kv...)
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

func configz(t *testing.T) primary.ConfigzResponse {
	t.Helper()
	resp, err := http.Get(env.debug.URL + "/debug/configz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cz primary.ConfigzResponse
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		t.Fatal(err)
	}
	return cz
}

// TestTrafficSplitAndHeaderRouting installs Istio's CRDs on the primary's running
// cluster (the primary started before they existed), applies a DestinationRule and
// VirtualServices through the API server, and measures from a real proxyless client:
// the 90/10 split over 1,000 calls, the header route to v2, retries hiding a failing pod,
// a route timeout, an injected abort and delay, and a refused VirtualService that changes nothing but is reported.
func TestTrafficSplitAndHeaderRouting(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "traffic"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "default service account in traffic", func() error {
		_, err := cs.CoreV1().ServiceAccounts("traffic").Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	if _, err := cs.CoreV1().Services("traffic").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "traffic"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: reviewsPort, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	addVersionPod(t, "reviews-v1", "v1", "v1", "10.99.30.1", false)
	addVersionPod(t, "reviews-v2", "v2", "v2", "10.99.30.2", false)
	addVersionPod(t, "reviews-v3", "v3", "v3", "10.99.30.3", false)
	addVersionPod(t, "reviews-v3-failing", "v3", "v3-failing", "10.99.30.4", true)

	// The API server validates users' YAML against Istio's schema, as a real cluster does.
	raw, err := yaml.YAMLToJSON([]byte(strings.Replace(trafficVS, "weight: 90", `weight: "ninety"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	err = env.istio.NetworkingV1().RESTClient().Post().Namespace("traffic").Resource("virtualservices").
		Body(raw).SetHeader("Content-Type", "application/json").Do(ctx).Error()
	if !apierrors.IsInvalid(err) {
		t.Fatalf("the API server must refuse a string weight as invalid; got %v", err)
	}
	dr := &networkingv1.DestinationRule{}
	vs := &networkingv1.VirtualService{}
	badVS := &networkingv1.VirtualService{}
	for y, into := range map[string]any{trafficDR: dr, trafficVS: vs, trafficBadVS: badVS} {
		if err := yaml.Unmarshal([]byte(y), into); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := env.istio.NetworkingV1().DestinationRules("traffic").Create(ctx, dr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().VirtualServices("traffic").Create(ctx, vs, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().VirtualServices("traffic").Create(ctx, badVS, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	kubetest.Eventually(t, 30*time.Second, "configz: the rule and the VirtualService applied, the typo refused", func() error {
		cz := configz(t)
		want := map[string]string{"DestinationRule/reviews": "", "VirtualService/reviews": "", "VirtualService/reviews-typo": primary.ReasonUnknownSubset}
		for _, o := range cz.Objects {
			if o.Namespace != "traffic" {
				continue
			}
			r, ok := want[o.Kind+"/"+o.Name]
			if ok && o.Applied == (r == "") && o.Reason == r {
				delete(want, o.Kind+"/"+o.Name)
			}
		}
		if !cz.Watching || len(want) > 0 {
			return fmt.Errorf("still waiting for %v in %+v", want, cz)
		}
		return nil
	})

	client := dialReviews(t)
	kubetest.Eventually(t, 30*time.Second, "jason routed to v2 and both subsets serving", func() error {
		j, _ := callVersions(client, 20, "jason")
		if j["v2"] != 20 {
			return fmt.Errorf("jason's calls: %v", j)
		}
		a, _ := callVersions(client, 50, "")
		if a["v1"] == 0 {
			return fmt.Errorf("anonymous calls: %v", a)
		}
		return nil
	})

	t.Run("90/10 split over 1000 calls", func(t *testing.T) {
		got, failed := callVersions(client, 1000, "")
		t.Logf("split: %v, %d failed", got, failed)
		if failed > 0 || got["v1"]+got["v2"] != 1000 {
			t.Fatalf("answers %v, %d failed", got, failed)
		}
		if got["v2"] < 50 || got["v2"] > 150 {
			t.Fatalf("v2 got %d of 1000 calls; want 100 ± 50 (10 %% ± 5 %%)", got["v2"])
		}
	})
	t.Run("header match routes to v2", func(t *testing.T) {
		got, failed := callVersions(client, 200, "jason")
		if failed > 0 || got["v2"] != 200 {
			t.Fatalf("jason's answers %v, %d failed", got, failed)
		}
		other, _ := callVersions(client, 200, "someone-else")
		if other["v1"] < 150 {
			t.Fatalf("another user's answers %v: the header match must be exact", other)
		}
	})
	t.Run("retries hide a failing pod", func(t *testing.T) {
		kubetest.Eventually(t, 30*time.Second, "both v3 pods in the v3 subset", func() error {
			got, failed := callWith(client, 40, "x-test", "noretry")
			if failed == 0 || got["v3"] == 0 {
				return fmt.Errorf("without retries: %v, %d failed (want answers from v3 and failures from its failing pod)", got, failed)
			}
			return nil
		})
		got, failed := callWith(client, 200, "x-test", "retry")
		if failed != 0 || got["v3"] != 200 {
			t.Fatalf("with retries: %v, %d of 200 failed", got, failed)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		start := time.Now()
		_, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-test", "slow", "sleep-ms", "3000"), &testgrpc.SimpleRequest{})
		if status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 2*time.Second {
			t.Fatalf("a 3 s call on the 300 ms route: %v after %s; want DeadlineExceeded near 300 ms", err, time.Since(start))
		}
		// The same slow server answers on a route without a timeout.
		if _, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, "sleep-ms", "600"), &testgrpc.SimpleRequest{}); err != nil {
			t.Fatalf("a 600 ms call on the default route: %v", err)
		}
	})
	t.Run("injected abort and delay", func(t *testing.T) {
		for range 20 {
			ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-test", "abort"), &testgrpc.SimpleRequest{})
			cancel()
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("call on the abort route: %v; want Unavailable", err)
			}
		}
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		start := time.Now()
		r, err := client.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-test", "delay"), &testgrpc.SimpleRequest{FillServerId: true})
		if err != nil || r.ServerId != "v1" || time.Since(start) < 400*time.Millisecond {
			t.Fatalf("call on the delay route: %v %v after %s; want v1 after at least 400 ms", r, err, time.Since(start))
		}
	})
	t.Run("the refusal is an Event on the object", func(t *testing.T) {
		kubetest.Eventually(t, 10*time.Second, "a Warning event on reviews-typo", func() error {
			evs, err := cs.CoreV1().Events("traffic").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=reviews-typo"})
			if err != nil {
				return err
			}
			for _, e := range evs.Items {
				if e.Type == corev1.EventTypeWarning && e.Reason == primary.EventReasonRejected && e.InvolvedObject.Kind == "VirtualService" &&
					strings.HasPrefix(e.Message, primary.ReasonUnknownSubset+": ") && strings.Contains(e.Message, `"v9"`) {
					return nil
				}
			}
			return fmt.Errorf("events: %+v", evs.Items)
		})
	})
	t.Run("the refusal is counted", func(t *testing.T) {
		resp, err := http.Get(env.debug.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), `isthmus_primary_config_rejected_total{kind="VirtualService",reason="unknown_subset"} 1`) {
			t.Fatalf("no rejection counted:\n%s", body)
		}
	})
}
