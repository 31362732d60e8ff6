package deploy

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"slices"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/yaml"
)

// kindInfo is what Apply needs to know of a kind Render makes: its resource, whether it
// is namespaced, and its place in the apply order (lower first; deletion runs in reverse).
// Render makes only these kinds, so no discovery is needed and an inventory entry of
// another kind is refused instead of guessed at.
type kindInfo struct {
	resource   schema.GroupVersionResource
	namespaced bool
	order      int
}

var kinds = map[schema.GroupVersionKind]kindInfo{
	{Version: "v1", Kind: "Namespace"}: {schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}, false, 0},
	{Group: "apiextensions.k8s.io", Version: "v1", Kind: "CustomResourceDefinition"}: {
		schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}, false, 1},
	{Version: "v1", Kind: "ServiceAccount"}: {schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}, true, 2},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRole"}: {
		schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}, false, 3},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "ClusterRoleBinding"}: {
		schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"}, false, 4},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "Role"}: {
		schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}, true, 5},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "RoleBinding"}: {
		schema.GroupVersionResource{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"}, true, 6},
	{Version: "v1", Kind: "ConfigMap"}: {schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, true, 7},
	{Version: "v1", Kind: "Secret"}:    {schema.GroupVersionResource{Version: "v1", Resource: "secrets"}, true, 8},
	{Version: "v1", Kind: "Service"}:   {schema.GroupVersionResource{Version: "v1", Resource: "services"}, true, 9},
	{Group: "discovery.k8s.io", Version: "v1", Kind: "EndpointSlice"}: {
		schema.GroupVersionResource{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}, true, 10},
	{Group: "apps", Version: "v1", Kind: "Deployment"}: {schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}, true, 11},
}

// infoOf returns the kindInfo of gvk, or an error naming it.
func infoOf(gvk schema.GroupVersionKind) (kindInfo, error) {
	ki, ok := kinds[gvk]
	if !ok {
		return kindInfo{}, fmt.Errorf("kind %s is not one deploy manages", gvk)
	}
	return ki, nil
}

// sortObjects orders objects for apply: by kind order, then namespace, then name.
func sortObjects(objs []*unstructured.Unstructured) {
	slices.SortStableFunc(objs, func(a, b *unstructured.Unstructured) int {
		return cmp.Or(cmp.Compare(kinds[a.GroupVersionKind()].order, kinds[b.GroupVersionKind()].order),
			cmp.Compare(a.GetNamespace(), b.GetNamespace()), cmp.Compare(a.GetName(), b.GetName()))
	})
}

// toUnstructured converts a typed object and drops what typed structs always carry but
// an applied configuration must not: null creationTimestamps and empty status.
func toUnstructured(obj runtime.Object) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, fmt.Errorf("convert %T: %w", obj, err)
	}
	u := &unstructured.Unstructured{Object: m}
	if _, err := infoOf(u.GroupVersionKind()); err != nil {
		return nil, err
	}
	delete(m, "status")
	dropNullTimestamps(m)
	return u, nil
}

func dropNullTimestamps(v any) {
	switch t := v.(type) {
	case map[string]any:
		if ts, ok := t["creationTimestamp"]; ok && ts == nil {
			delete(t, "creationTimestamp")
		}
		for _, c := range t {
			dropNullTimestamps(c)
		}
	case []any:
		for _, c := range t {
			dropNullTimestamps(c)
		}
	}
}

func mustQuantity(s string) resource.Quantity { return resource.MustParse(s) }

// Encode writes objs as format "yaml" (documents separated by ---, for kubectl apply -f,
// Kustomize and GitOps tools) or "json" (one v1 List, which kubectl also applies).
func Encode(w io.Writer, objs []*unstructured.Unstructured, format string) error {
	switch format {
	case "yaml":
		for i, o := range objs {
			data, err := yaml.Marshal(o.Object)
			if err != nil {
				return fmt.Errorf("deploy: encode %s: %w", refOf(o), err)
			}
			if i > 0 {
				if _, err := io.WriteString(w, "---\n"); err != nil {
					return err
				}
			}
			if _, err := w.Write(data); err != nil {
				return err
			}
		}
		return nil
	case "json":
		items := make([]any, len(objs))
		for i, o := range objs {
			items[i] = o.Object
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(map[string]any{"apiVersion": "v1", "kind": "List", "items": items})
	}
	return fmt.Errorf("deploy: encode: unknown format %q (want yaml or json)", format)
}
