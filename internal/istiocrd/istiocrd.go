package istiocrd

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// networkingYAML holds Istio's own definitions of the networking.istio.io kinds Isthmus
// reads (see the package comment for where it comes from).
//
//go:embed networking.gen.yaml
var networkingYAML []byte

// securityYAML holds Istio's own definitions of the security.istio.io kinds Isthmus reads
// (AuthorizationPolicy, PeerAuthentication), from the same file of the same module.
//
//go:embed security.gen.yaml
var securityYAML []byte

// FieldManager is the server-side apply field manager Apply uses.
const FieldManager = "isthmus"

// Definitions returns the embedded CRDs, decoded, in file order (networking, then
// security).
func Definitions() ([]*apiextv1.CustomResourceDefinition, error) {
	var out []*apiextv1.CustomResourceDefinition
	for i, doc := range bytes.Split(append(append(slices.Clip(networkingYAML), "\n---\n"...), securityYAML...), []byte("\n---\n")) {
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		crd := &apiextv1.CustomResourceDefinition{}
		if err := yaml.UnmarshalStrict(doc, crd); err != nil {
			return nil, fmt.Errorf("istiocrd: document %d: %w", i, err)
		}
		out = append(out, crd)
	}
	return out, nil
}

// Apply installs (or updates) the embedded CRDs with server-side apply and waits until the
// API server reports each one Established, so that objects of those kinds can be created
// as soon as it returns. It is idempotent.
func Apply(ctx context.Context, cfg *rest.Config) error {
	cs, err := apiext.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("istiocrd: client: %w", err)
	}
	crds, err := Definitions()
	if err != nil {
		return err
	}
	for _, crd := range crds {
		crd.TypeMeta = metav1.TypeMeta{APIVersion: "apiextensions.k8s.io/v1", Kind: "CustomResourceDefinition"}
		body, err := json.Marshal(crd)
		if err != nil {
			return fmt.Errorf("istiocrd: %s: %w", crd.Name, err)
		}
		force := true
		if _, err := cs.ApiextensionsV1().CustomResourceDefinitions().Patch(ctx, crd.Name, types.ApplyPatchType, body,
			metav1.PatchOptions{FieldManager: FieldManager, Force: &force}); err != nil {
			return fmt.Errorf("istiocrd: applying %s: %w", crd.Name, err)
		}
	}
	for _, crd := range crds {
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			got, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil // transient; the deadline reports it
			}
			for _, c := range got.Status.Conditions {
				if c.Type == apiextv1.Established && c.Status == apiextv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("istiocrd: %s not established: %w", crd.Name, err)
		}
	}
	return nil
}
