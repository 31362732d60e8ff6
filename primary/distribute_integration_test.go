package primary_test

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
)

const distDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dist, namespace: policy}
spec:
  host: dist
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute: [{from: r1, to: {r1: 20, r2: 80}}]
`

// TestLocalityDistributeProxyless applies a DestinationRule with localityLbSetting
// distribute through the API server and measures from a real proxyless client in region
// r1: 1,000 calls split 20/80 between the pod in r1 (cluster 1) and the one in r2
// (cluster 2) within ±5 %, and after the rule is changed to send r1's callers only to
// r2, every call goes there.
func TestLocalityDistributeProxyless(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	linkCluster(t, 1)
	labelRegion(t, 0, "r1")
	labelRegion(t, 1, "r2")
	for i := range 2 {
		policyService(t, i, "dist")
	}
	addPolicyPod(t, 0, "dist", "dist-r1", "10.99.62.1")
	addPolicyPod(t, 1, "dist", "dist-r2", "10.99.62.2")
	dr := &networkingv1.DestinationRule{}
	if err := yaml.Unmarshal([]byte(distDR), dr); err != nil {
		t.Fatal(err)
	}
	drs := env.istio.NetworkingV1().DestinationRules("policy")
	if _, err := drs.Create(ctx, dr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = drs.Delete(context.Background(), "dist", metav1.DeleteOptions{}) })
	c := dialPolicy(t, "dist", "r1")
	split := func() (r1, r2, failed int) {
		for range 1000 {
			switch id, _ := callPolicy(c); id {
			case "dist-r1":
				r1++
			case "dist-r2":
				r2++
			default:
				failed++
			}
		}
		return
	}
	kubetest.Eventually(t, 60*time.Second, "1,000 calls split 20/80 by locality weight", func() error {
		r1, r2, failed := split()
		if failed > 0 || math.Abs(float64(r2)/1000-0.8) > 0.05 {
			return fmt.Errorf("r1 %d, r2 %d, failed %d", r1, r2, failed)
		}
		t.Logf("distribute 20/80: r1 %d, r2 %d of 1,000", r1, r2)
		return nil
	})
	cur, err := drs.Get(ctx, "dist", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.TrafficPolicy.LoadBalancer.LocalityLbSetting.Distribute[0].To = map[string]uint32{"r2": 100}
	if _, err := drs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "every call to r2 after the update", func() error {
		got := answering(c)
		if got["dist-r2"] != 20 {
			return fmt.Errorf("answers %v", got)
		}
		return nil
	})
}
