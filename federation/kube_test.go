package federation

import (
	"log/slog"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// TestKubeExportsRecompute: a service leaves the mesh only with a ServiceExport, a
// Service and a policy rule for its namespace; every other case is a listed problem.
func TestKubeExportsRecompute(t *testing.T) {
	svc := func(ns, name string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name},
				Ports: []corev1.ServicePort{{Name: "grpc-echo", Port: 8080}, {Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}}}}
	}
	pod := func(ns, name, app, sa string, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
			Spec: corev1.PodSpec{ServiceAccountName: sa}, Status: corev1.PodStatus{Phase: phase}}
	}
	allPods := []*corev1.Pod{pod("demo", "echo-0", "echo", "echo", corev1.PodRunning), pod("demo", "echo-1", "echo", "", corev1.PodPending),
		pod("demo", "echo-2", "echo", "echo", corev1.PodRunning), pod("demo", "echo-old", "echo", "retired", corev1.PodSucceeded),
		pod("demo", "other-0", "other", "other", corev1.PodRunning)}
	podsOf := func(ns string, sel labels.Selector) ([]*corev1.Pod, error) {
		var out []*corev1.Pod
		for _, p := range allPods {
			if p.Namespace == ns && sel.Matches(labels.Set(p.Labels)) {
				out = append(out, p)
			}
		}
		return out, nil
	}
	services := map[string]*corev1.Service{"demo/echo": svc("demo", "echo"), "private/secret": svc("private", "secret")}
	notFound := apierrors.NewNotFound(schema.GroupResource{Resource: "services"}, "x")
	lookup := func(ns, name string) (*corev1.Service, error) {
		if s, ok := services[ns+"/"+name]; ok {
			return s, nil
		}
		return nil, notFound
	}
	exported := []mesh.ServiceKey{{Namespace: "demo", Name: "echo"}, {Namespace: "private", Name: "secret"}, {Namespace: "demo", Name: "ghost"}}
	cases := []struct {
		name     string
		policy   *string
		want     []string
		problems []string
	}{
		{"no policy", nil, nil, []string{"no export policy"}},
		{"broken policy", ptr(`{"rules":[{"peer":"mesh-b"}]}`), nil, []string{"refused, nothing is exported"}},
		{"demo to mesh-b", ptr(`{"rules":[{"peer":"mesh-b","namespaces":["demo"]}]}`), []string{"demo/echo→[mesh-b]"},
			[]string{"ServiceExport demo/ghost: no Service", "ServiceExport private/secret: no export rule names namespace private"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			k, err := NewKubeExports(KubeExportsConfig{Client: nil, MCS: nil, Namespace: "istio-system"})
			if err == nil {
				t.Fatal("config without clients accepted")
			}
			k = &KubeExports{cfg: KubeExportsConfig{Namespace: "istio-system", TrustDomain: "a.example", Log: slog.New(slog.DiscardHandler)}, changed: make(chan struct{}, 1)}
			cm := func() (*corev1.ConfigMap, error) {
				if c.policy == nil {
					return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "configmaps"}, ExportPolicyConfigMap)
				}
				return &corev1.ConfigMap{Data: map[string]string{"policy": *c.policy}}, nil
			}
			k.recompute(lookup, cm, func() ([]mesh.ServiceKey, error) { return exported, nil }, podsOf)
			var got []string
			for _, e := range k.Exports() {
				got = append(got, e.Key.String()+"→["+strings.Join(meshStrings(e.Consumers), ",")+"]")
				if len(e.Ports) != 1 || e.Ports[0].Protocol != mesh.ProtocolGRPC {
					t.Errorf("ports %+v: want the TCP port only, as GRPC", e.Ports)
				}
				// The selected pods' service accounts (a pending pod with none runs as
				// default; a finished pod and another service's pods are left out).
				if got, want := identityStrings(e.Identities), []string{"spiffe://a.example/ns/demo/sa/default", "spiffe://a.example/ns/demo/sa/echo"}; !slices.Equal(got, want) {
					t.Errorf("identities %v, want %v", got, want)
				}
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("exports %v, want %v", got, c.want)
			}
			probs := strings.Join(k.Problems(), "\n")
			for _, p := range c.problems {
				if !strings.Contains(probs, p) {
					t.Errorf("problems %q lack %q", probs, p)
				}
			}
		})
	}
}

func ptr(s string) *string { return &s }

func meshStrings(ms []mesh.MeshID) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = string(m)
	}
	return out
}
