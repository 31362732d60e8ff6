package trust

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// BundleConfigMap is the ConfigMap (in the control-plane namespace) that holds a cluster's
// trust bundles: one key "<trust-domain>.bundle" per domain with its SPIFFE bundle (JWKS),
// and "aliases" with a JSON object alias → target domain. WatchBundleStore keeps a
// BundleSet in step with it (as Istio's agents watch istio-ca-root-cert), but no running
// Isthmus process watches it yet: only `isthmus trust bundle` reads and writes it.
const BundleConfigMap = "isthmus-trust-bundles"

const (
	bundleKeySuffix = ".bundle"
	aliasesKey      = "aliases"
)

// ErrBundleConflict is returned when the store changed between read and write more often
// than retries allow; nothing was written.
var ErrBundleConflict = errors.New("trust: the bundle store changed concurrently; nothing was written, run the command again")

// BundleStore reads and changes the bundle ConfigMap of one cluster. Every change is
// checked as a whole before it is written, and written with the version it was read at,
// so a refused or conflicting change leaves the store as it was.
type BundleStore struct {
	Client    kubernetes.Interface
	Namespace string
}

// Load returns the stored bundles and aliases as a BundleSet (empty if the ConfigMap does
// not exist).
func (s BundleStore) Load(ctx context.Context) (*BundleSet, error) {
	cm, err := s.Client.CoreV1().ConfigMaps(s.Namespace).Get(ctx, BundleConfigMap, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return NewBundleSet(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("trust: bundle store %s/%s: %w", s.Namespace, BundleConfigMap, err)
	}
	return ParseBundleData(cm.Data)
}

// ParseBundleData builds a BundleSet from the ConfigMap's data, refusing anything
// malformed with the key it is in: an unknown key, a bad domain name, a bundle without
// X.509 roots, an alias whose target has no bundle. Keys are read in sorted order, so the
// error reported for a store with several faults is always the same one; aliases are
// applied after every bundle, so their targets exist when they are checked.
func ParseBundleData(data map[string]string) (*BundleSet, error) {
	set := NewBundleSet()
	for _, key := range slices.Sorted(maps.Keys(data)) {
		if key == aliasesKey {
			continue
		}
		name, ok := strings.CutSuffix(key, bundleKeySuffix)
		if !ok {
			return nil, fmt.Errorf("trust: bundle store: unexpected key %q (want <trust-domain>%s or %s)", key, bundleKeySuffix, aliasesKey)
		}
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			return nil, fmt.Errorf("trust: bundle store: key %q: %w", key, err)
		}
		b, err := spiffebundle.Parse(td, []byte(data[key]))
		if err != nil {
			return nil, fmt.Errorf("trust: bundle store: key %q: %w", key, err)
		}
		if len(b.X509Authorities()) == 0 {
			return nil, fmt.Errorf("trust: bundle store: key %q: no X.509 authorities", key)
		}
		if err := set.Set(b); err != nil {
			return nil, err
		}
	}
	if raw, ok := data[aliasesKey]; ok {
		var aliases map[string]string
		if err := json.Unmarshal([]byte(raw), &aliases); err != nil {
			return nil, fmt.Errorf("trust: bundle store: key %q: %w", aliasesKey, err)
		}
		for _, a := range slices.Sorted(maps.Keys(aliases)) {
			alias, err := mesh.ParseTrustDomain(a)
			if err != nil {
				return nil, fmt.Errorf("trust: bundle store: alias %q: %w", a, err)
			}
			target, err := mesh.ParseTrustDomain(aliases[a])
			if err != nil {
				return nil, fmt.Errorf("trust: bundle store: alias %q: target: %w", a, err)
			}
			if _, ok := set.Get(target); !ok {
				return nil, fmt.Errorf("trust: bundle store: alias %s → %s: no bundle for %s", alias, target, target)
			}
			if err := set.SetAlias(alias, target); err != nil {
				return nil, err
			}
		}
	}
	return set, nil
}

// BundleData renders a BundleSet as the ConfigMap's data.
func BundleData(set *BundleSet) (map[string]string, error) {
	data := map[string]string{}
	for _, td := range set.Domains() {
		b, _ := set.Get(td)
		raw, err := b.Marshal()
		if err != nil {
			return nil, fmt.Errorf("trust: bundle %s: %w", td, err)
		}
		data[string(td)+bundleKeySuffix] = string(raw)
	}
	if aliases := set.Aliases(); len(aliases) > 0 {
		m := map[string]string{}
		for a, t := range aliases {
			m[string(a)] = string(t)
		}
		raw, _ := json.Marshal(m)
		data[aliasesKey] = string(raw)
	}
	return data, nil
}

// Update applies change to the stored set and writes the result, re-reading and retrying
// when another writer got there first. change returns an error to refuse; the result is
// parsed back in full before it is written.
//
// change may run more than once (once per attempt, at most five), each time on a fresh
// set read from the API server, so it must do nothing but change the set it is given.
// The write carries the resourceVersion it was read at: a concurrent writer makes it
// conflict and retry, never overwrite. The set returned is what was written.
func (s BundleStore) Update(ctx context.Context, change func(*BundleSet) error) (*BundleSet, error) {
	var written *BundleSet
	err := updateConfigMap(ctx, s.Client, s.Namespace, BundleConfigMap, "bundle store", func(old map[string]string) (map[string]string, error) {
		set, err := ParseBundleData(old)
		if err != nil {
			return nil, fmt.Errorf("%w (fix or delete the ConfigMap)", err)
		}
		if err := change(set); err != nil {
			return nil, err
		}
		data, err := BundleData(set)
		if err != nil {
			return nil, err
		}
		if _, err := ParseBundleData(data); err != nil {
			return nil, fmt.Errorf("trust: the change would leave the store invalid: %w", err)
		}
		written = set
		return data, nil
	})
	if err != nil {
		return nil, err
	}
	return written, nil
}

// WatchBundleStore keeps set equal to the stored bundles until ctx ends, calling onChange
// after each change (e.g. SDS.RefreshBundles). A malformed store is reported through
// onError and the last good bundles stay; a deleted ConfigMap empties set (no peer domain
// is trusted any more). It returns nil when ctx ends. onChange and onError run on the
// informer's goroutine, one at a time. No Isthmus process calls it yet.
func WatchBundleStore(ctx context.Context, client kubernetes.Interface, namespace string, set *BundleSet, onChange func(), onError func(error)) error {
	apply := func(obj any) {
		cm, ok := obj.(*corev1.ConfigMap)
		data := map[string]string{}
		if ok {
			data = cm.Data
		}
		next, err := ParseBundleData(data)
		if err != nil {
			if onError != nil {
				onError(err)
			}
			return
		}
		set.replace(next)
		if onChange != nil {
			onChange()
		}
	}
	lw := cache.NewListWatchFromClient(client.CoreV1().RESTClient(), "configmaps", namespace, fields.OneTermEqualSelector("metadata.name", BundleConfigMap))
	_, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw, ObjectType: &corev1.ConfigMap{}, ResyncPeriod: 10 * time.Minute,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    apply,
			UpdateFunc: func(_, obj any) { apply(obj) },
			DeleteFunc: func(any) { apply(nil) },
		},
	})
	ctrl.RunWithContext(ctx)
	return nil
}

// replace swaps in other's bundles and aliases in one step, so a reader sees the old set
// or the new one, never a mix. The maps are shared, not copied: other must not be used
// afterwards.
func (s *BundleSet) replace(other *BundleSet) {
	other.mu.RLock()
	bundles, aliases := other.bundles, other.aliases
	other.mu.RUnlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.bundles, s.aliases = bundles, aliases
}
