package trust_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

func bundleFor(t *testing.T, td string) (*trust.Authority, func(*trust.BundleSet) error) {
	t.Helper()
	root, err := trust.NewRoot(mustTD(t, td), trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := trust.LocalBundle(root, 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return root, func(s *trust.BundleSet) error { return s.Set(b) }
}

func storeNamespace(t *testing.T) string {
	t.Helper()
	ns := "bundles-" + strings.ToLower(strings.ReplaceAll(t.Name(), "_", "-"))
	if len(ns) > 60 {
		ns = ns[:60]
	}
	ns = strings.TrimRight(ns, "-")
	if _, err := env.client.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	return ns
}

// TestBundleStoreOnARealAPIServer: bundles and aliases round-trip through the ConfigMap,
// refused changes leave it untouched, concurrent writers are retried, and a watcher (what a
// workload's agent runs) follows every change into its SDS validation context.
func TestBundleStoreOnARealAPIServer(t *testing.T) {
	needEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	store := trust.BundleStore{Client: env.client, Namespace: storeNamespace(t)}

	// A watcher with an SDS server, as a workload's agent would run them.
	watched := trust.NewBundleSet()
	sds := trust.NewSDS(trust.SDSConfig{Bundles: watched})
	var changes, watchErrs atomic.Int64
	go trust.WatchBundleStore(ctx, env.client, store.Namespace, watched, func() { changes.Add(1); sds.RefreshBundles() },
		func(err error) { watchErrs.Add(1); t.Logf("watch: %v", err) })

	_, addEast := bundleFor(t, "east.example")
	westRoot, addWest := bundleFor(t, "west.example")
	if _, err := store.Update(ctx, addEast); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Update(ctx, addWest); err != nil {
		t.Fatal(err)
	}
	set, err := store.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := set.Domains(); len(got) != 2 || got[0] != "east.example" || got[1] != "west.example" {
		t.Fatalf("stored domains %v", got)
	}

	// An alias: identities of old.example verify under west.example's roots.
	if _, err := store.Update(ctx, func(s *trust.BundleSet) error { return s.SetAlias("old.example", "west.example") }); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 10*time.Second, "the watcher to see the alias", func() error {
		if watched.Aliases()["old.example"] != "west.example" || len(watched.Domains()) != 2 {
			return errors.New("not yet")
		}
		return nil
	})
	// West's root (unconstrained) signs an old.example identity, as the roots of a renamed
	// domain did before the rename.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	csr, _ := x509.ParseCertificateRequest(der)
	oldID, _ := mesh.ParseIdentity("spiffe://old.example/ns/demo/sa/legacy")
	legacyRoot := *westRoot
	legacyRoot.TrustDomain = "old.example"
	chain, err := legacyRoot.Sign(context.Background(), csr, oldID, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	raw := [][]byte{pemDER(t, chain[0])}
	if id, err := watched.VerifyPeer(raw); err != nil || id != oldID {
		t.Fatalf("alias: %v %v", id, err)
	}

	// Refusals leave the store as it was.
	before, _ := env.client.CoreV1().ConfigMaps(store.Namespace).Get(ctx, trust.BundleConfigMap, metav1.GetOptions{})
	for name, change := range map[string]func(*trust.BundleSet) error{
		"alias to a missing domain":    func(s *trust.BundleSet) error { return s.SetAlias("x.example", "missing.example") },
		"alias shadowing a bundle":     func(s *trust.BundleSet) error { return s.SetAlias("east.example", "west.example") },
		"bundle for an aliased name":   func(s *trust.BundleSet) error { _, add := bundleFor(t, "old.example"); return add(s) },
		"refused by the change itself": func(*trust.BundleSet) error { return errors.New("no") },
	} {
		if _, err := store.Update(ctx, change); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	after, _ := env.client.CoreV1().ConfigMaps(store.Namespace).Get(ctx, trust.BundleConfigMap, metav1.GetOptions{})
	if after.ResourceVersion != before.ResourceVersion {
		t.Fatal("a refused change wrote the store")
	}

	// A writer that loses a race is retried on the new version and keeps both changes.
	raced := false
	_, addNorth := bundleFor(t, "north.example")
	_, addSouth := bundleFor(t, "south.example")
	if _, err := store.Update(ctx, func(s *trust.BundleSet) error {
		if !raced {
			raced = true
			if _, err := store.Update(ctx, addSouth); err != nil {
				return err
			}
		}
		return addNorth(s)
	}); err != nil {
		t.Fatal(err)
	}
	set, _ = store.Load(ctx)
	if len(set.Domains()) != 4 {
		t.Fatalf("after a concurrent write: %v", set.Domains())
	}

	// Removal reaches the watcher; its SDS drops the domain.
	if _, err := store.Update(ctx, func(s *trust.BundleSet) error { s.RemoveAlias("old.example"); s.Remove("west.example"); return nil }); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 10*time.Second, "the watcher to drop west.example", func() error {
		if _, ok := watched.Get("west.example"); ok {
			return errors.New("still there")
		}
		return nil
	})
	if _, err := watched.VerifyPeer(raw); !errors.Is(err, trust.ErrNoBundle) {
		t.Fatalf("the alias's identity still verifies after its target was removed: %v", err)
	}

	// A store broken by hand is reported, and the watcher keeps the last good bundles.
	n := changes.Load()
	after, _ = env.client.CoreV1().ConfigMaps(store.Namespace).Get(ctx, trust.BundleConfigMap, metav1.GetOptions{})
	after.Data["bad.example.bundle"] = "{not json"
	if _, err := env.client.CoreV1().ConfigMaps(store.Namespace).Update(ctx, after, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Load(ctx); err == nil || !strings.Contains(err.Error(), `key "bad.example.bundle"`) {
		t.Fatalf("malformed store: %v", err)
	}
	if _, err := store.Update(ctx, addWest); err == nil || !strings.Contains(err.Error(), "fix or delete the ConfigMap") {
		t.Fatalf("update of a malformed store: %v", err)
	}
	kubetest.Eventually(t, 10*time.Second, "the watcher to report the malformed store", func() error {
		if watchErrs.Load() == 0 {
			return errors.New("no error reported yet")
		}
		return nil
	})
	if changes.Load() != n || len(watched.Domains()) != 3 {
		t.Fatalf("the watcher applied a malformed store: %v", watched.Domains())
	}
}

func pemDER(t *testing.T, s string) []byte {
	t.Helper()
	b, _ := pem.Decode([]byte(s))
	if b == nil {
		t.Fatal("not PEM")
	}
	return b.Bytes
}
