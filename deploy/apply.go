package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
)

// FieldManager is the server-side apply field manager of every object deploy applies
// (the same as internal/istiocrd's, so CRDs applied by either are owned once).
const FieldManager = "isthmus"

// ApplyConfig says where and how to apply.
type ApplyConfig struct {
	// Client talks to the cluster; required.
	Client dynamic.Interface
	// Name and Namespace locate the inventory (the installation's name, default
	// "isthmus", and its control-plane namespace, default istio-system); Apply takes
	// them from the rendered objects' labels when empty.
	Name, Namespace string
	// Wait makes Apply wait until every Deployment has rolled out, and Uninstall until
	// every deleted object is gone. Off, they return once the API server has accepted
	// the change.
	Wait bool
	// Timeout bounds each wait; default 5 minutes.
	Timeout time.Duration
	// Progress receives one line per step; nil discards them.
	Progress io.Writer
}

func (c ApplyConfig) withDefaults() ApplyConfig {
	if c.Name == "" {
		c.Name = "isthmus"
	}
	if c.Namespace == "" {
		c.Namespace = "istio-system"
	}
	if c.Timeout == 0 {
		c.Timeout = 5 * time.Minute
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return c
}

// Result says what an Apply or Uninstall did.
type Result struct {
	// Applied are the objects sent (unchanged ones included: server-side apply makes no
	// write for them).
	Applied []Ref `json:"applied,omitempty"`
	// Pruned are the objects a previous apply made that this one no longer renders,
	// deleted; for Uninstall, everything deleted.
	Pruned []Ref `json:"pruned,omitempty"`
	// Released are objects that existed before Isthmus applied them: left in place (only
	// the isthmus.io/install label removed) instead of deleted.
	Released []Ref `json:"released,omitempty"`
}

// Apply applies objs (Render's output) with server-side apply under FieldManager,
// forcing ownership of the fields it sets; CRDs are waited for until Established before
// anything else is applied. Then it deletes what the previous inventory lists and objs
// do not, and records objs as the new inventory. Objects that existed before the first
// apply and were not made by this installation are remembered as adopted: pruning and
// Uninstall leave them in place (removing only the install label) instead of deleting them.
//
// Every object is checked before any is sent, so a bad object never follows a
// half-applied change. An error part way (the API server refusing an object) leaves the
// previous inventory in place plus what was applied, so that the next Apply or
// Uninstall still finds everything.
func Apply(ctx context.Context, cfg ApplyConfig, objs []*unstructured.Unstructured) (*Result, error) {
	if cfg.Client == nil {
		return nil, errors.New("deploy: apply: no client")
	}
	if cfg.Name == "" && len(objs) > 0 {
		cfg.Name = objs[0].GetLabels()[LabelInstall]
	}
	if cfg.Namespace == "" {
		for _, o := range objs {
			if o.GetKind() == "Namespace" {
				cfg.Namespace = o.GetName()
				break
			}
		}
	}
	cfg = cfg.withDefaults()
	for _, o := range objs {
		ki, err := infoOf(o.GroupVersionKind())
		if err != nil {
			return nil, fmt.Errorf("deploy: apply %s: %w", refOf(o), err)
		}
		if ki.namespaced != (o.GetNamespace() != "") {
			return nil, fmt.Errorf("deploy: apply %s: namespace must be set exactly for namespaced kinds", refOf(o))
		}
	}
	inv := inventory{client: cfg.Client, name: cfg.Name, namespace: cfg.Namespace}
	prev, err := inv.load(ctx)
	if err != nil {
		return nil, err
	}
	adopted := map[Ref]bool{}
	for _, e := range prev {
		if e.Adopted {
			adopted[e.Ref] = true
		}
	}
	res := &Result{}
	var next []entry
	record := func() error { return inv.save(ctx, mergeEntries(prev, next)) }
	for i, o := range objs {
		ref := refOf(o)
		if !slices.ContainsFunc(prev, func(e entry) bool { return e.Ref == ref }) {
			// New to the inventory: adopted if it exists and is not ours.
			existing, err := cfg.Client.Resource(kinds[o.GroupVersionKind()].resource).Namespace(o.GetNamespace()).Get(ctx, o.GetName(), metav1.GetOptions{})
			switch {
			case err == nil && existing.GetLabels()[LabelInstall] != cfg.Name:
				adopted[ref] = true
			case err != nil && !apierrors.IsNotFound(err):
				return res, fmt.Errorf("deploy: apply %s: %w", ref, err)
			}
		}
		next = append(next, entry{Ref: ref, Adopted: adopted[ref]})
		if i == 0 {
			// The inventory needs its namespace; record before anything else exists so
			// that a failure part way leaves a list Uninstall can use.
			if err := apply(ctx, cfg, o); err != nil {
				return res, err
			}
			if err := record(); err != nil {
				return res, err
			}
			res.Applied = append(res.Applied, ref)
			continue
		}
		if err := apply(ctx, cfg, o); err != nil {
			_ = record()
			return res, err
		}
		res.Applied = append(res.Applied, ref)
		if o.GetKind() == "CustomResourceDefinition" && (i+1 == len(objs) || objs[i+1].GetKind() != "CustomResourceDefinition") {
			if err := waitEstablished(ctx, cfg, objs); err != nil {
				_ = record()
				return res, err
			}
		}
	}
	if err := record(); err != nil {
		return res, err
	}
	var gone []entry
	for _, e := range prev {
		if !slices.ContainsFunc(next, func(n entry) bool { return n.Ref == e.Ref }) {
			gone = append(gone, e)
		}
	}
	if err := remove(ctx, cfg, gone, res); err != nil {
		return res, err
	}
	if err := inv.save(ctx, next); err != nil {
		return res, err
	}
	if cfg.Wait {
		if err := waitRollouts(ctx, cfg, objs); err != nil {
			return res, err
		}
	}
	return res, nil
}

// Uninstall deletes everything the inventory of cfg.Name in cfg.Namespace lists (adopted
// objects are left in place, without the install label) and then the inventory. Without an inventory it
// deletes nothing and says so: it never guesses by labels.
func Uninstall(ctx context.Context, cfg ApplyConfig) (*Result, error) {
	if cfg.Client == nil {
		return nil, errors.New("deploy: uninstall: no client")
	}
	cfg = cfg.withDefaults()
	inv := inventory{client: cfg.Client, name: cfg.Name, namespace: cfg.Namespace}
	prev, err := inv.load(ctx)
	if err != nil {
		return nil, err
	}
	if prev == nil { // no inventory at all (an empty one is a non-nil empty list)
		return nil, fmt.Errorf("deploy: uninstall: no installation %q in namespace %s (no ConfigMap %s): nothing to remove", cfg.Name, cfg.Namespace, inv.configMapName())
	}
	res := &Result{}
	// The namespace goes last, after the inventory, so that a failure part way keeps the
	// list of what is left.
	var ns []entry
	rest := slices.DeleteFunc(slices.Clone(prev), func(e entry) bool {
		if e.Kind == "Namespace" && e.Name == cfg.Namespace {
			ns = append(ns, e)
			return true
		}
		return false
	})
	if err := remove(ctx, cfg, rest, res); err != nil {
		return res, err
	}
	if err := inv.delete(ctx); err != nil {
		return res, err
	}
	if err := remove(ctx, cfg, ns, res); err != nil {
		return res, err
	}
	return res, nil
}

// apply sends one object with server-side apply.
func apply(ctx context.Context, cfg ApplyConfig, o *unstructured.Unstructured) error {
	body, err := json.Marshal(o.Object)
	if err != nil {
		return fmt.Errorf("deploy: apply %s: %w", refOf(o), err)
	}
	ki := kinds[o.GroupVersionKind()]
	if _, err := cfg.Client.Resource(ki.resource).Namespace(o.GetNamespace()).Patch(ctx, o.GetName(), types.ApplyPatchType, body,
		metav1.PatchOptions{FieldManager: FieldManager, Force: ptr(true)}); err != nil {
		return fmt.Errorf("deploy: apply %s: %w", refOf(o), err)
	}
	fmt.Fprintf(cfg.Progress, "applied %s\n", refOf(o))
	return nil
}

// remove deletes (or, adopted, releases) entries in reverse apply order and, with
// cfg.Wait, waits until each deleted object is gone.
func remove(ctx context.Context, cfg ApplyConfig, es []entry, res *Result) error {
	es = slices.Clone(es)
	slices.SortStableFunc(es, func(a, b entry) int { return kinds[b.gvk()].order - kinds[a.gvk()].order })
	var deleted []entry
	for _, e := range es {
		ki, err := infoOf(e.gvk())
		if err != nil {
			return fmt.Errorf("deploy: inventory entry %s: %w", e.Ref, err)
		}
		rc := cfg.Client.Resource(ki.resource).Namespace(e.Namespace)
		if e.Adopted {
			// Not ours to delete: only the install label goes, so that the object no
			// longer counts as this installation's. Isthmus's other fields stay (giving
			// them up could strip what the owner set to the same values, such as a CRD
			// schema internal/istiocrd applied under the same field manager).
			patch := []byte(`{"metadata":{"labels":{"` + LabelInstall + `":null}}}`)
			if _, err := rc.Patch(ctx, e.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("deploy: release %s: %w", e.Ref, err)
			}
			fmt.Fprintf(cfg.Progress, "left %s in place (it existed before Isthmus applied it)\n", e.Ref)
			res.Released = append(res.Released, e.Ref)
			continue
		}
		// A Deployment goes in the foreground, so that its ReplicaSets and pods are gone
		// when the wait ends (the namespace may stay); everything else in the background:
		// it has no dependents, and foreground deletion of a CRD waits on the garbage
		// collector, which may be resyncing for the very CRDs being removed.
		policy := metav1.DeletePropagationBackground
		if e.Kind == "Deployment" {
			policy = metav1.DeletePropagationForeground
		}
		if e.Kind == "CustomResourceDefinition" && cfg.Wait {
			waitListable(ctx, cfg, rc, e.Name)
		}
		err = rc.Delete(ctx, e.Name, metav1.DeleteOptions{PropagationPolicy: &policy})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("deploy: delete %s: %w", e.Ref, err)
		}
		fmt.Fprintf(cfg.Progress, "deleted %s\n", e.Ref)
		res.Pruned = append(res.Pruned, e.Ref)
		deleted = append(deleted, e)
	}
	if !cfg.Wait {
		return nil
	}
	for _, e := range deleted {
		rc := cfg.Client.Resource(kinds[e.gvk()].resource).Namespace(e.Namespace)
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, cfg.Timeout, true, func(ctx context.Context) (bool, error) {
			_, err := rc.Get(ctx, e.Name, metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		if err != nil {
			return fmt.Errorf("deploy: %s still exists %s after its deletion (%s): %w", e.Ref, cfg.Timeout, whyStuck(rc, e.Name), err)
		}
	}
	return nil
}

// waitListable waits (up to cfg.Timeout) until the instances of CRD name can be listed.
// The API server's finalizer for a deleted CRD must list its instances; if the CRD's
// storage is still initializing (a CRD created moments before, on a loaded server), that
// list fails and the finalizer backs off exponentially, past any sensible wait. Deleting
// only once a list works lets the finalizer's first attempt succeed. It never fails: on
// timeout the deletion goes ahead and the wait after it reports what is stuck.
func waitListable(ctx context.Context, cfg ApplyConfig, rc dynamic.ResourceInterface, name string) {
	crd, err := rc.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return
	}
	group, _, _ := unstructured.NestedString(crd.Object, "spec", "group")
	plural, _, _ := unstructured.NestedString(crd.Object, "spec", "names", "plural")
	versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
	version := ""
	for _, v := range versions {
		m, _ := v.(map[string]any)
		if served, _ := m["served"].(bool); served {
			if version, _ = m["name"].(string); version != "" {
				break
			}
		}
	}
	if group == "" || plural == "" || version == "" {
		return
	}
	cr := cfg.Client.Resource(schema.GroupVersionResource{Group: group, Version: version, Resource: plural})
	waited := false
	_ = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, cfg.Timeout, true, func(ctx context.Context) (bool, error) {
		_, err := cr.List(ctx, metav1.ListOptions{Limit: 1})
		if err != nil && !waited {
			fmt.Fprintf(cfg.Progress, "waiting until the API server can list %s.%s before deleting its CRD: %v\n", plural, group, err)
			waited = true
		}
		return err == nil, nil
	})
}

// whyStuck says what keeps a deleted object from going: its finalizers and, for a CRD
// or a namespace, the condition the finalizing controller reported last, so that an
// operator can see whether it is still working or failing.
func whyStuck(rc dynamic.ResourceInterface, name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := rc.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Sprintf("could not read it: %v", err)
	}
	why := "finalizers " + fmt.Sprint(got.GetFinalizers())
	conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		switch m["type"] {
		case "Terminating", "NamespaceDeletionContentFailure", "NamespaceContentRemaining", "NamespaceFinalizersRemaining", "NamespaceDeletionDiscoveryFailure":
			if m["status"] == "True" || m["type"] == "Terminating" {
				why += fmt.Sprintf("; %s=%v %v: %v", m["type"], m["status"], m["reason"], m["message"])
			}
		}
	}
	return why
}

// waitEstablished waits until every CRD in objs is Established, so that the kinds it
// defines can be served.
func waitEstablished(ctx context.Context, cfg ApplyConfig, objs []*unstructured.Unstructured) error {
	rc := cfg.Client.Resource(kinds[schema.GroupVersionKind{Group: "apiextensions.k8s.io", Version: "v1", Kind: "CustomResourceDefinition"}].resource)
	for _, o := range objs {
		if o.GetKind() != "CustomResourceDefinition" {
			continue
		}
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, cfg.Timeout, true, func(ctx context.Context) (bool, error) {
			got, err := rc.Get(ctx, o.GetName(), metav1.GetOptions{})
			if err != nil {
				return false, nil // transient; the deadline reports it
			}
			conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
			for _, c := range conds {
				m, _ := c.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("deploy: CRD %s not Established within %s: %w", o.GetName(), cfg.Timeout, err)
		}
	}
	return nil
}

// waitRollouts waits until every Deployment in objs has rolled out: the controller has
// seen the latest generation and every replica is updated and available. It prints
// progress whenever the counts change.
func waitRollouts(ctx context.Context, cfg ApplyConfig, objs []*unstructured.Unstructured) error {
	rc := cfg.Client.Resource(schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"})
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		var last, status string
		err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, cfg.Timeout, true, func(ctx context.Context) (bool, error) {
			got, err := rc.Namespace(o.GetNamespace()).Get(ctx, o.GetName(), metav1.GetOptions{})
			if err != nil {
				status = err.Error()
				return false, nil
			}
			want, _, _ := unstructured.NestedInt64(got.Object, "spec", "replicas")
			gen, _, _ := unstructured.NestedInt64(got.Object, "metadata", "generation")
			seen, _, _ := unstructured.NestedInt64(got.Object, "status", "observedGeneration")
			updated, _, _ := unstructured.NestedInt64(got.Object, "status", "updatedReplicas")
			avail, _, _ := unstructured.NestedInt64(got.Object, "status", "availableReplicas")
			status = fmt.Sprintf("%d of %d replicas updated, %d available", updated, want, avail)
			if status != last {
				fmt.Fprintf(cfg.Progress, "waiting for %s: %s\n", refOf(o), status)
				last = status
			}
			return seen >= gen && updated == want && avail == want, nil
		})
		if err != nil {
			return fmt.Errorf("deploy: %s did not roll out within %s (%s): check its pods (kubectl -n %s describe deployment %s); a cluster without kubelets never runs them, use --wait=false there: %w",
				refOf(o), cfg.Timeout, status, o.GetNamespace(), o.GetName(), err)
		}
		fmt.Fprintf(cfg.Progress, "%s rolled out\n", refOf(o))
	}
	return nil
}
