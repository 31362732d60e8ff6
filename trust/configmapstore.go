package trust

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// storeWriteAttempts is how many times updateConfigMap reads and writes before it gives
// up with ErrBundleConflict: enough for a handful of concurrent writers (CLI commands and
// primaries' federation), few enough that a hot loop of writers is reported, not hidden.
const storeWriteAttempts = 5

// updateConfigMap is the one optimistic read-modify-write of the ConfigMaps trust keeps
// its state in (the bundle store, the federation store). what names the store in errors.
//
// edit receives the ConfigMap's data as read (nil when it does not exist yet) and returns
// the data to write; it is called once per attempt, each time on a fresh read, so it must
// do nothing but compute (and it should parse its result back in full, so that a refused
// change writes nothing). An error from edit ends the update unwritten. The write carries
// the resourceVersion it was read at: a concurrent writer makes it conflict and retry,
// never overwrite.
func updateConfigMap(ctx context.Context, client kubernetes.Interface, namespace, name, what string, edit func(map[string]string) (map[string]string, error)) error {
	cms := client.CoreV1().ConfigMaps(namespace)
	for range storeWriteAttempts {
		cm, err := cms.Get(ctx, name, metav1.GetOptions{})
		exists := err == nil
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("trust: %s %s/%s: %w", what, namespace, name, err)
		}
		if !exists {
			cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace,
				Labels: map[string]string{"app.kubernetes.io/managed-by": "isthmus"}}}
		}
		data, err := edit(cm.Data)
		if err != nil {
			return err
		}
		cm.Data = data
		if exists {
			_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		} else {
			_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
		}
		if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) {
			continue
		}
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("trust: %s %s/%s: %w (create the namespace, or name the control-plane namespace)", what, namespace, name, err)
		}
		if err != nil {
			return fmt.Errorf("trust: %s %s/%s: %w", what, namespace, name, err)
		}
		return nil
	}
	return ErrBundleConflict
}
