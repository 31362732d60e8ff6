package federation

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	mcscrd "sigs.k8s.io/mcs-api/config/crd"
	"sigs.k8s.io/yaml"
)

// crdFieldManager owns the MCS CRDs that ApplyCRDs applies.
const crdFieldManager = "isthmus-federation"

// ApplyCRDs installs (or updates) the MCS ServiceExport and ServiceImport CRDs, as
// sigs.k8s.io/mcs-api ships them, with server-side apply, and waits until both are
// Established. It is idempotent.
func ApplyCRDs(ctx context.Context, cfg *rest.Config) error {
	cs, err := apiext.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("federation: CRD client: %w", err)
	}
	var names []string
	for _, raw := range [][]byte{mcscrd.ServiceExportCRD, mcscrd.ServiceImportCRD} {
		var crd apiextv1.CustomResourceDefinition
		if err := yaml.Unmarshal(raw, &crd); err != nil {
			return fmt.Errorf("federation: MCS CRD: %w", err)
		}
		crd.TypeMeta = metav1.TypeMeta{APIVersion: "apiextensions.k8s.io/v1", Kind: "CustomResourceDefinition"}
		body, err := json.Marshal(&crd)
		if err != nil {
			return fmt.Errorf("federation: MCS CRD %s: %w", crd.Name, err)
		}
		force := true
		if _, err := cs.ApiextensionsV1().CustomResourceDefinitions().Patch(ctx, crd.Name, types.ApplyPatchType, body,
			metav1.PatchOptions{FieldManager: crdFieldManager, Force: &force}); err != nil {
			return fmt.Errorf("federation: apply CRD %s: %w", crd.Name, err)
		}
		names = append(names, crd.Name)
	}
	for _, name := range names {
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			got, err := cs.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, name, metav1.GetOptions{})
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
			return fmt.Errorf("federation: CRD %s not established: %w", name, err)
		}
	}
	return nil
}
