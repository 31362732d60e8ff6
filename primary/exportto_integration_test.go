package primary_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// The exportTo test's configuration, as users write it: the service owner's rule and
// route (every call to v1, exported everywhere by default), and namespace "beta"'s own
// route for the same host, exported only to beta ("."), sending its calls to v2.
const (
	tenancyDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shelf, namespace: tenancy}
spec:
  host: shelf
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
`
	tenancyVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shelf, namespace: tenancy}
spec:
  hosts: [shelf]
  http:
  - route:
    - destination: {host: shelf, subset: v1}
`
	betaVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shelf-beta, namespace: beta}
spec:
  exportTo: ["."]
  hosts: [shelf.tenancy.svc.cluster.local]
  http:
  - route:
    - destination: {host: shelf.tenancy.svc.cluster.local, subset: v2}
`
)

// versionedService creates namespace ns (if needed), a Service name and one pod per
// version (labelled version=<v>, at the given address) answering "<name>-<v>".
func versionedService(t *testing.T, ns, name string, ips map[string]string) {
	t.Helper()
	ctx := context.Background()
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 20*time.Second, "default service account in "+ns, func() error {
		_, err := cs.CoreV1().ServiceAccounts(ns).Get(ctx, "default", metav1.GetOptions{})
		return err
	})
	if _, err := cs.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name},
			Ports: []corev1.ServicePort{{Name: "grpc", Port: scopePort, TargetPort: intstr.FromString("grpc")}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for version, ip := range ips {
		if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
			t.Fatal(err)
		}
		lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(scopePort)))
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer()
		testgrpc.RegisterTestServiceServer(s, &toggleServer{id: name + "-" + version})
		go s.Serve(lis)
		env.servers.Store(ip, s)
		if _, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name + "-" + version, Namespace: ns, Labels: map[string]string{"app": name, "version": version},
				Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: name, Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: scopePort}}}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// TestExportToRoutesPerNamespace applies the service owner's DestinationRule and
// VirtualService and a second namespace's private VirtualService for the same host
// through the API server, and checks from real proxyless clients in two namespaces that
// each gets its own routes: alpha's calls all reach v1, beta's all reach v2 (20 calls
// each), configz lists both routes applied; deleting beta's route gives beta the owner's.
func TestExportToRoutesPerNamespace(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	versionedService(t, "tenancy", "shelf", map[string]string{"v1": "10.99.71.1", "v2": "10.99.71.2"})
	for _, ns := range []string{"alpha", "beta"} {
		if _, err := env.clients[0].CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	dr := &networkingv1.DestinationRule{}
	if err := yaml.Unmarshal([]byte(tenancyDR), dr); err != nil {
		t.Fatal(err)
	}
	if _, err := env.istio.NetworkingV1().DestinationRules("tenancy").Create(ctx, dr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, y := range []string{tenancyVS, betaVS} {
		vs := &networkingv1.VirtualService{}
		if err := yaml.Unmarshal([]byte(y), vs); err != nil {
			t.Fatal(err)
		}
		if _, err := env.istio.NetworkingV1().VirtualServices(vs.Namespace).Create(ctx, vs, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	kubetest.Eventually(t, 30*time.Second, "configz: both VirtualServices and the rule applied", func() error {
		applied := map[string]bool{}
		for _, o := range configz(t).Objects {
			if o.Applied && len(o.Warnings) == 0 {
				applied[o.Kind+" "+o.Namespace+"/"+o.Name] = true
			}
		}
		for _, want := range []string{"DestinationRule tenancy/shelf", "VirtualService tenancy/shelf", "VirtualService beta/shelf-beta"} {
			if !applied[want] {
				return fmt.Errorf("%s not applied without warnings yet (%v)", want, applied)
			}
		}
		return nil
	})
	const host = "shelf.tenancy.svc.cluster.local"
	alpha, beta := dialFrom(t, "alpha", host), dialFrom(t, "beta", host)
	// allFrom passes when n calls in a row are answered by want.
	allFrom := func(c testgrpc.TestServiceClient, want string, n int) func() error {
		return func() error {
			var got []string
			for range n {
				id, err := callPolicy(c)
				if err != nil {
					return err
				}
				got = append(got, id)
				if id != want {
					return fmt.Errorf("answered by %s", strings.Join(got, ","))
				}
			}
			return nil
		}
	}
	kubetest.Eventually(t, 30*time.Second, "alpha's calls all reaching v1", allFrom(alpha, "shelf-v1", 20))
	kubetest.Eventually(t, 30*time.Second, "beta's calls all reaching v2", allFrom(beta, "shelf-v2", 20))
	// Both views are current now: alpha is still on v1.
	if err := allFrom(alpha, "shelf-v1", 20)(); err != nil {
		t.Fatalf("alpha after beta's view: %v", err)
	}

	if err := env.istio.NetworkingV1().VirtualServices("beta").Delete(ctx, "shelf-beta", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "beta's calls reaching v1 once its own route is deleted", allFrom(beta, "shelf-v1", 20))
}
