package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
)

// InventoryPrefix starts the name of an installation's inventory ConfigMap:
// isthmus-install-<name>, in the installation's namespace.
const InventoryPrefix = "isthmus-install-"

// inventoryKey is the ConfigMap data key holding the entries as JSON.
const inventoryKey = "objects"

// Ref names one object.
type Ref struct {
	Group     string `json:"group,omitempty"`
	Version   string `json:"version"`
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
}

// String is kind/name or kind namespace/name, with the group for non-core kinds.
func (r Ref) String() string {
	k := r.Kind
	if r.Group != "" {
		k += "." + r.Group
	}
	if r.Namespace != "" {
		return k + " " + r.Namespace + "/" + r.Name
	}
	return k + " " + r.Name
}

func refOf(o *unstructured.Unstructured) Ref {
	gvk := o.GroupVersionKind()
	return Ref{Group: gvk.Group, Version: gvk.Version, Kind: gvk.Kind, Namespace: o.GetNamespace(), Name: o.GetName()}
}

// entry is one inventory line: an object an apply made, and whether it existed before
// (adopted: released rather than deleted).
type entry struct {
	Ref
	Adopted bool `json:"adopted,omitempty"`
}

func (e entry) gvk() schema.GroupVersionKind {
	return schema.GroupVersionKind{Group: e.Group, Version: e.Version, Kind: e.Kind}
}

// mergeEntries is next followed by the entries of prev that next lacks: what exists while
// an apply is part way.
func mergeEntries(prev, next []entry) []entry {
	out := slices.Clone(next)
	for _, p := range prev {
		if !slices.ContainsFunc(out, func(e entry) bool { return e.Ref == p.Ref }) {
			out = append(out, p)
		}
	}
	return out
}

// inventory is the ConfigMap that lists what an installation made.
type inventory struct {
	client          dynamic.Interface
	name, namespace string
}

var configMaps = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}

func (inv inventory) configMapName() string { return InventoryPrefix + inv.name }

// load returns the recorded entries; nil (and no error) when there is no inventory.
func (inv inventory) load(ctx context.Context) ([]entry, error) {
	cm, err := inv.client.Resource(configMaps).Namespace(inv.namespace).Get(ctx, inv.configMapName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("deploy: inventory %s/%s: %w", inv.namespace, inv.configMapName(), err)
	}
	data, _, _ := unstructured.NestedString(cm.Object, "data", inventoryKey)
	es := []entry{} // found: never nil
	if err := json.Unmarshal([]byte(data), &es); err != nil {
		return nil, fmt.Errorf("deploy: inventory %s/%s: key %s: %w", inv.namespace, inv.configMapName(), inventoryKey, err)
	}
	for _, e := range es {
		if _, err := infoOf(e.gvk()); err != nil {
			return nil, fmt.Errorf("deploy: inventory %s/%s: entry %s: %w", inv.namespace, inv.configMapName(), e.Ref, err)
		}
	}
	return es, nil
}

// save applies the inventory (server-side, so an unchanged list makes no write).
func (inv inventory) save(ctx context.Context, es []entry) error {
	data, err := json.MarshalIndent(es, "", " ")
	if err != nil {
		return err
	}
	body, err := json.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]any{"name": inv.configMapName(), "namespace": inv.namespace,
			"labels": map[string]string{LabelManagedBy: ManagedBy, LabelInstall: inv.name}},
		"data": map[string]string{inventoryKey: string(data)},
	})
	if err != nil {
		return err
	}
	if _, err := inv.client.Resource(configMaps).Namespace(inv.namespace).Patch(ctx, inv.configMapName(), types.ApplyPatchType, body,
		metav1.PatchOptions{FieldManager: FieldManager, Force: ptr(true)}); err != nil {
		return fmt.Errorf("deploy: save inventory %s/%s: %w", inv.namespace, inv.configMapName(), err)
	}
	return nil
}

func (inv inventory) delete(ctx context.Context) error {
	err := inv.client.Resource(configMaps).Namespace(inv.namespace).Delete(ctx, inv.configMapName(), metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deploy: delete inventory %s/%s: %w", inv.namespace, inv.configMapName(), err)
	}
	return nil
}
