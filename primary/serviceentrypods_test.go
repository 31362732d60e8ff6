package primary

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
)

const selectorEntry = `
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop, resourceVersion: "9"}
spec:
  hosts: [legacy.shop.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: grpc, protocol: GRPC, targetPort: 9090}]
  workloadSelector: {labels: {app: legacy}}
`

func selPod(ns, name, ip string, ready bool, lbls map[string]string) *corev1.Pod {
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: lbls},
		Spec:       corev1.PodSpec{ServiceAccountName: "legacy"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: st}}},
	}
}

// TestEntrySelectorEndpoints checks which pods a workloadSelector makes endpoints: those
// of the entry's namespace with every selector label and an address, on the entry's
// target port, with the pod's identity, mTLS only when the entry is MESH_INTERNAL and
// the pod is labelled for it, and health from Ready.
func TestEntrySelectorEndpoints(t *testing.T) {
	p := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, selectorEntry)}, nil)
	if len(p.selectors) != 1 || !p.status[0].Applied || p.shard.Services["legacy.shop.internal"] == nil || len(p.shard.Endpoints) != 0 {
		t.Fatalf("plan: %+v", p)
	}
	pods := []*corev1.Pod{
		selPod("shop", "a", "10.0.0.1", true, map[string]string{"app": "legacy", LabelTLSMode: TLSModeIstio}),
		selPod("shop", "b", "10.0.0.2", false, map[string]string{"app": "legacy", "v": "2"}),
		selPod("shop", "c", "10.0.0.3", true, map[string]string{"app": "other"}),
		selPod("shop", "no-ip", "", true, map[string]string{"app": "legacy"}),
		selPod("other", "d", "10.0.0.4", true, map[string]string{"app": "legacy"}),
	}
	tr := translator{cluster: "c2", trustDomain: "cluster.local", defaultNetwork: "n2",
		namespace: func(string) *corev1.Namespace { return nil }, node: func(string) *corev1.Node { return nil }}
	out := tr.selectedEndpoints(p.selectors, func(ns string) []*corev1.Pod {
		var in []*corev1.Pod
		for _, pod := range pods {
			if pod.Namespace == ns {
				in = append(in, pod)
			}
		}
		return in
	})
	eps := out["legacy.shop.internal"]
	if len(eps) != 2 {
		t.Fatalf("endpoints %+v; want pods a and b", eps)
	}
	a, b := eps[0], eps[1]
	if a.Address.String() != "10.0.0.1" || a.Ports[0].Number != 9090 || a.Cluster != "c2" || a.Network != "n2" ||
		!a.MTLSReady || a.Health != mesh.HealthHealthy || a.Identity.String() != "spiffe://cluster.local/ns/shop/sa/legacy" {
		t.Errorf("pod a: %+v", a)
	}
	if b.Address.String() != "10.0.0.2" || b.MTLSReady || b.Health != mesh.HealthUnhealthy || b.Labels["v"] != "2" {
		t.Errorf("pod b: %+v", b)
	}
	external := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, selectorEntry[:len(selectorEntry)-1]+"\n")}, nil)
	external.selectors[0].Internal = false
	if eps := tr.selectedEndpoints(external.selectors, func(string) []*corev1.Pod { return pods[:1] })["legacy.shop.internal"]; eps[0].MTLSReady {
		t.Error("a MESH_EXTERNAL entry's pod got mTLS")
	}
}

// TestWatcherAddsSelectedPods runs a cluster watcher over a fake cluster: when the
// selectors name its pods they become the entry host's endpoints in the watcher's
// shard, merged with the entry's service; a pod relabelled out of the selector leaves;
// and removing the selector removes them all.
func TestWatcherAddsSelectedPods(t *testing.T) {
	client := fake.NewClientset(
		selPod("shop", "a", "10.0.0.1", true, map[string]string{"app": "legacy"}),
		selPod("shop", "b", "10.0.0.2", true, map[string]string{"app": "legacy"}),
	)
	reg := NewRegistry()
	sels := newEntrySelectors()
	w := newClusterWatcher("c2", "local", client, reg, watcherConfig{
		SyncTimeout: 10 * time.Second, StaleWindow: time.Minute, ProbeInterval: time.Second,
		Domain: "cluster.local", TrustDomain: "cluster.local", SystemNamespace: "istio-system",
		Entries: sels, Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	w.readyz = func(context.Context) error { return nil }
	w.start()
	w.enable()
	defer w.stop()
	p := planServiceEntries("c1", "cluster.local", []*networkingv1.ServiceEntry{mustSE(t, selectorEntry)}, nil)
	reg.ReplaceShard(ShardKey{Source: SourceServiceEntry, Cluster: "c1"}, p.shard)
	host := mesh.Hostname("legacy.shop.internal")
	wait := func(what string, want ...string) {
		t.Helper()
		for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			var got []string
			if s := reg.View().Service(host); s != nil {
				for _, e := range s.Endpoints {
					got = append(got, e.Address.String())
				}
			}
			if slices.Equal(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: endpoints %v; want %v", what, got, want)
			}
		}
	}
	wait("no selector yet")
	sels.set(p.selectors)
	wait("both pods selected", "10.0.0.1", "10.0.0.2")
	pod, err := client.CoreV1().Pods("shop").Get(context.Background(), "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Labels = map[string]string{"app": "new"}
	if _, err := client.CoreV1().Pods("shop").Update(context.Background(), pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("b relabelled out", "10.0.0.1")
	sels.set(nil)
	wait("selector removed")
	if d := reg.Shard(w.shard); d != nil && len(d.Endpoints[host]) > 0 {
		t.Errorf("the shard still has %v", d.Endpoints[host])
	}
}
