package primary

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	fakediscovery "k8s.io/client-go/discovery/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

// newTestWatcher returns a config watcher over fake clients; withCRDs makes discovery
// list Istio's resources. Only the no-CRD path is tested with fakes: informers over
// istio.io/client-go's fake clientset never sync with client-go v0.37 (its fake predates
// watch-list), so reading objects is tested on a real API server
// (TestTrafficSplitAndHeaderRouting, where the CRDs appear after the primary started).
func newTestWatcher(withCRDs bool, objs ...*networkingv1.VirtualService) (*istioConfigWatcher, *istiofake.Clientset, *atomic.Bool) {
	k := k8sfake.NewClientset()
	if withCRDs {
		k.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{
			GroupVersion: istioNetworkingGV,
			APIResources: []metav1.APIResource{{Name: resVirtualServices}, {Name: resDestRules}},
		}}
	}
	ic := istiofake.NewSimpleClientset()
	for _, o := range objs {
		ic.Tracker().Add(o)
	}
	absent := &atomic.Bool{}
	return &istioConfigWatcher{
		client: ic, discovery: k.Discovery(), reg: NewRegistry(), domain: "cluster.local", poll: 10 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), absent: func() { absent.Store(true) },
	}, ic, absent
}

// TestTrafficWatcherWithoutCRDs checks that a cluster without Istio's CRDs is no error:
// the watcher says so once (readiness then does not wait for configuration), stores no
// configuration, and stops cleanly.
func TestTrafficWatcherWithoutCRDs(t *testing.T) {
	w, _, absent := newTestWatcher(false)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.run(ctx) }()
	kubetest.Eventually(t, 5*time.Second, "the absent callback", func() error {
		if !absent.Load() {
			return fmt.Errorf("not called")
		}
		return nil
	})
	if w.reg.View().Traffic != nil {
		t.Fatal("traffic configuration without CRDs")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
