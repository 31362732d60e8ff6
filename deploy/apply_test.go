package deploy

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// shared is the package's one real cluster (etcd, kube-apiserver, the controller manager
// and the node agent); nil under -short. Tests that use it run one after another and
// leave it as they found it.
var shared *kubelocal.Cluster

func TestMain(m *testing.M) {
	os.Exit(kubetest.Main(m, 1, "dp", func(c []*kubelocal.Cluster) (func(), error) {
		shared = c[0]
		return func() {}, nil
	}))
}

func dynClient(t *testing.T) dynamic.Interface {
	t.Helper()
	if shared == nil {
		t.Skip("integration test: starts a real Kubernetes cluster; runs without -short")
	}
	dc, err := dynamic.NewForConfig(shared.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	return dc
}

// snapshotKinds are the kinds an installation could touch, directly or through the
// controllers (ReplicaSets, Pods and EndpointSlices of its Deployments and Services).
var snapshotKinds = []schema.GroupVersionResource{
	{Version: "v1", Resource: "namespaces"}, {Version: "v1", Resource: "serviceaccounts"}, {Version: "v1", Resource: "secrets"},
	{Version: "v1", Resource: "configmaps"}, {Version: "v1", Resource: "services"}, {Version: "v1", Resource: "pods"},
	{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}, {Group: "apps", Version: "v1", Resource: "deployments"},
	{Group: "apps", Version: "v1", Resource: "replicasets"},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}, {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}, {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"},
	{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"},
}

// snapshot lists every object of snapshotKinds as "resource namespace/name" → its
// resourceVersion.
func snapshot(t *testing.T, dc dynamic.Interface) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, gvr := range snapshotKinds {
		l, err := dc.Resource(gvr).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range l.Items {
			out[gvr.Resource+" "+o.GetNamespace()+"/"+o.GetName()] = o.GetResourceVersion()
		}
	}
	return out
}

func keys(m map[string]string) []string {
	k := make([]string, 0, len(m))
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}

// installed returns the resourceVersion of every rendered object and of the inventory.
func installed(t *testing.T, dc dynamic.Interface, objs []*unstructured.Unstructured) map[string]string {
	t.Helper()
	out := map[string]string{}
	get := func(gvr schema.GroupVersionResource, ns, name string) {
		o, err := dc.Resource(gvr).Namespace(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out[gvr.Resource+" "+ns+"/"+name] = o.GetResourceVersion()
	}
	for _, o := range objs {
		get(kinds[o.GroupVersionKind()].resource, o.GetNamespace(), o.GetName())
	}
	get(configMaps, "istio-system", InventoryPrefix+"isthmus")
	return out
}

// clusterWait bounds each of Apply's and Uninstall's waits in these tests. CRD deletion is
// the slow one: its finalizer rebuilds the CRD's storage and OpenAPI on every status
// change (Istio's schemas are large), which took over 2 minutes once under -race on a
// starved API server; a real failure still fails, only later.
const clusterWait = 6 * time.Minute

// TestApplyTwiceAndUninstall installs every golden case on the real cluster: the first
// apply creates everything (and, the node agent playing the kubelet, the Deployments roll
// out), the second changes nothing (every resourceVersion kept), and Uninstall leaves
// exactly the objects that were there before.
func TestApplyTwiceAndUninstall(t *testing.T) {
	dc := dynClient(t)
	ctx := context.Background()
	for name, v := range goldenCases(t) {
		t.Run(name, func(t *testing.T) {
			before := snapshot(t, dc)
			t.Cleanup(func() {
				if t.Failed() { // leave the cluster clean for the next case
					Uninstall(context.Background(), ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait})
				}
			})
			objs := mustRender(t, v)
			var progress bytes.Buffer
			cfg := ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait, Progress: &progress}
			res, err := Apply(ctx, cfg, objs)
			if err != nil {
				t.Fatalf("first apply: %v\n%s", err, progress.String())
			}
			if len(res.Applied) != len(objs) || len(res.Pruned) != 0 {
				t.Fatalf("first apply: %d applied, %d pruned; want %d, 0", len(res.Applied), len(res.Pruned), len(objs))
			}
			if slices.ContainsFunc(objs, func(o *unstructured.Unstructured) bool { return o.GetKind() == "Deployment" }) &&
				!strings.Contains(progress.String(), "rolled out") {
				t.Errorf("no rollout progress:\n%s", progress.String())
			}
			first := installed(t, dc, objs)
			if _, err := Apply(ctx, cfg, mustRender(t, v)); err != nil {
				t.Fatalf("second apply: %v", err)
			}
			if d := cmp.Diff(first, installed(t, dc, objs)); d != "" {
				t.Errorf("the second apply changed objects (-first +second resourceVersion):\n%s", d)
			}
			// CRD deletion is slow on a loaded API server (see clusterWait); the time it
			// took is logged.
			progress.Reset()
			start := time.Now()
			res, err = Uninstall(ctx, ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait, Progress: &progress})
			if err != nil {
				t.Fatalf("uninstall: %v\n%s", err, progress.String())
			}
			t.Logf("uninstall and its wait took %s", time.Since(start).Round(time.Millisecond))
			if len(res.Pruned) != len(objs) {
				t.Errorf("uninstall deleted %d objects, want %d", len(res.Pruned), len(objs))
			}
			after := snapshot(t, dc)
			if d := cmp.Diff(keys(before), keys(after)); d != "" {
				t.Errorf("uninstall did not restore the cluster's objects (-before +after):\n%s", d)
			}
		})
	}
}

// TestApplyPrunesWhatIsNoLongerRendered moves one installation from multi-network to
// single-cluster: the gateway's objects and the peers' reader go, the rest stays.
func TestApplyPrunesWhatIsNoLongerRendered(t *testing.T) {
	dc := dynClient(t)
	ctx := context.Background()
	cases := goldenCases(t)
	before := snapshot(t, dc)
	if _, err := Apply(ctx, ApplyConfig{Client: dc}, mustRender(t, cases["multi-network-primary"])); err != nil {
		t.Fatal(err)
	}
	single := mustRender(t, cases["single-cluster-primary"])
	res, err := Apply(ctx, ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait}, single)
	if err != nil {
		t.Fatal(err)
	}
	var pruned []string
	for _, r := range res.Pruned {
		pruned = append(pruned, r.String())
	}
	sort.Strings(pruned)
	want := []string{
		"ClusterRole.rbac.authorization.k8s.io isthmus-reader-istio-system",
		"ClusterRoleBinding.rbac.authorization.k8s.io isthmus-reader-istio-system",
		"ConfigMap istio-system/istio-ca-root-cert",
		"Deployment.apps istio-system/istio-eastwestgateway",
		"Role.rbac.authorization.k8s.io istio-system/istio-eastwestgateway",
		"RoleBinding.rbac.authorization.k8s.io istio-system/istio-eastwestgateway",
		"Secret istio-system/istio-remote-secret-cluster-2",
		"Service istio-system/istio-eastwestgateway",
		"ServiceAccount istio-system/isthmus-reader",
		"ServiceAccount istio-system/istio-eastwestgateway",
	}
	if d := cmp.Diff(want, pruned); d != "" {
		t.Errorf("pruned (-want +got):\n%s", d)
	}
	if _, err := dc.Resource(kinds[schema.GroupVersionKind{Group: "apps", Version: "v1", Kind: "Deployment"}].resource).Namespace("istio-system").
		Get(ctx, GatewayName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("the gateway Deployment is still there: %v", err)
	}
	inv, err := inventory{client: dc, name: "isthmus", namespace: "istio-system"}.load(ctx)
	if err != nil || len(inv) != len(single) {
		t.Errorf("inventory has %d entries (%v), want the %d rendered", len(inv), err, len(single))
	}
	if _, err := Uninstall(ctx, ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait}); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(keys(before), keys(snapshot(t, dc))); d != "" {
		t.Errorf("uninstall after a prune left the cluster changed (-before +after):\n%s", d)
	}
}

// TestObjectsThatExistedBeforeAreLeftInPlace: a namespace the operator made (with a
// Secret of theirs in it) survives install and uninstall; only what Isthmus created goes.
func TestObjectsThatExistedBeforeAreLeftInPlace(t *testing.T) {
	dc := dynClient(t)
	ctx := context.Background()
	cs, err := shared.Client()
	if err != nil {
		t.Fatal(err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system", Labels: map[string]string{"team": "mesh"}}}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	theirs := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "operator-notes", Namespace: "istio-system"}, StringData: map[string]string{"k": "v"}}
	if _, err := cs.CoreV1().Secrets("istio-system").Create(ctx, theirs, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cs.CoreV1().Namespaces().Delete(context.Background(), "istio-system", metav1.DeleteOptions{})
		kubetest.Eventually(t, time.Minute, "istio-system deleted", func() error {
			if _, err := cs.CoreV1().Namespaces().Get(context.Background(), "istio-system", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				return fmt.Errorf("still there: %v", err)
			}
			return nil
		})
	})
	// The controllers fill a new namespace (its default service account, the root CA
	// ConfigMap): wait for them, so that the snapshot holds what the namespace keeps.
	kubetest.Eventually(t, time.Minute, "istio-system's default service account and kube-root-ca.crt", func() error {
		if _, err := cs.CoreV1().ServiceAccounts("istio-system").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return err
		}
		_, err := cs.CoreV1().ConfigMaps("istio-system").Get(ctx, "kube-root-ca.crt", metav1.GetOptions{})
		return err
	})
	before := snapshot(t, dc)
	if _, err := Apply(ctx, ApplyConfig{Client: dc}, mustRender(t, goldenCases(t)["single-cluster-primary"])); err != nil {
		t.Fatal(err)
	}
	res, err := Uninstall(ctx, ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Released) != 1 || res.Released[0].Kind != "Namespace" {
		t.Errorf("released %v, want the namespace alone", res.Released)
	}
	got, err := cs.CoreV1().Namespaces().Get(ctx, "istio-system", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the operator's namespace is gone: %v", err)
	}
	if got.Labels["team"] != "mesh" || got.Labels[LabelInstall] != "" {
		t.Errorf("namespace labels after uninstall: %v, want the operator's and no install label", got.Labels)
	}
	if _, err := cs.CoreV1().Secrets("istio-system").Get(ctx, "operator-notes", metav1.GetOptions{}); err != nil {
		t.Errorf("the operator's secret is gone: %v", err)
	}
	// The controllers' own objects in the namespace (kube-root-ca.crt, the default
	// service account) were there before too; everything else went.
	if d := cmp.Diff(keys(before), keys(snapshot(t, dc))); d != "" {
		t.Errorf("uninstall (-before +after):\n%s", d)
	}
}

// TestFailedApplyIsUninstallable: an object the API server refuses part way stops Apply
// with its name, and the inventory still lists what was applied, so Uninstall removes it.
func TestFailedApplyIsUninstallable(t *testing.T) {
	dc := dynClient(t)
	ctx := context.Background()
	before := snapshot(t, dc)
	// A role without Istio's CRDs: what this test is about (the inventory written part way,
	// Uninstall reading it) does not need them, and CRD deletion, whose finalizer rebuilds
	// each CRD's storage and OpenAPI (seconds apiece on a starved API server), is
	// TestApplyTwiceAndUninstall's, with a wait sized for it.
	objs := mustRender(t, goldenCases(t)["primary-remote-remote"])
	bad := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Service",
		"metadata": map[string]any{"name": "broken", "namespace": "istio-system"},
		"spec":     map[string]any{"ports": []any{map[string]any{"port": int64(0)}}}}}
	objs = append(objs, bad)
	sortObjects(objs)
	_, err := Apply(ctx, ApplyConfig{Client: dc}, objs)
	if err == nil || !strings.Contains(err.Error(), "deploy: apply Service istio-system/broken") {
		t.Fatalf("Apply: %v, want the refusal of Service istio-system/broken", err)
	}
	if _, err := Uninstall(ctx, ApplyConfig{Client: dc, Wait: true, Timeout: clusterWait}); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(keys(before), keys(snapshot(t, dc))); d != "" {
		t.Errorf("uninstall after a failed apply (-before +after):\n%s", d)
	}
	// Nothing installed: Uninstall says so and deletes nothing.
	if _, err := Uninstall(ctx, ApplyConfig{Client: dc}); err == nil || !strings.Contains(err.Error(), `no installation "isthmus" in namespace istio-system`) {
		t.Errorf("Uninstall without an inventory: %v", err)
	}
	// An unknown kind is refused before anything is sent.
	cm := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "batch/v1", "kind": "Job", "metadata": map[string]any{"name": "j", "namespace": "istio-system"}}}
	if _, err := Apply(ctx, ApplyConfig{Client: dc}, []*unstructured.Unstructured{cm}); err == nil || !strings.Contains(err.Error(), "is not one deploy manages") {
		t.Errorf("Apply of a Job: %v", err)
	}
}
