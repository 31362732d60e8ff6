package scenarios_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// denyClient denies the scenario's probe client (its SPIFFE ID) on every echo pod.
const denyClient = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-probe-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/clients/sa/client]}
`

// probe asks the cluster's probe client to call echo n times and returns what it saw.
func probe(t *testing.T, r *scenarios.Run, cluster string, n int) *scenarios.ProbeResult {
	t.Helper()
	q := url.Values{"target": {"echo.demo.svc.cluster.local:8080"}, "calls": {fmt.Sprint(n)}}
	resp, err := http.Get("http://" + r.Clients[cluster].Addresses["admin"] + "/probe?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("probe: %s", resp.Status)
	}
	res := &scenarios.ProbeResult{}
	if err := json.NewDecoder(resp.Body).Decode(res); err != nil {
		t.Fatal(err)
	}
	return res
}

// TestXDSServerWorkloads runs the single-cluster scenario with its echo pods serving
// through xds.NewGRPCServer (`isthmus workload --xds-server`, processes the runner starts):
// the scenario's checks pass over the inbound Listeners' mTLS (every server sees the
// client's identity), then an AuthorizationPolicy applied through the API server denies
// the probe client's identity on the running servers, and deleting it lets it back.
func TestXDSServerWorkloads(t *testing.T) {
	p := provider(t)
	top, err := scenarios.Builtin("single-cluster")
	if err != nil {
		t.Fatal(err)
	}
	top.Workloads[0].XDSServer = true
	r := upTopology(t, top, p)
	rep := check(t, r, scenarios.CheckOptions{})
	if !rep.Passed {
		t.Fatal("single-cluster with xDS-enabled servers failed its checks")
	}

	ctx := context.Background()
	c := r.Env.Clusters()[0]
	if err := istiocrd.Apply(ctx, c.REST); err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(c.REST)
	if err != nil {
		t.Fatal(err)
	}
	ap := &securityv1.AuthorizationPolicy{}
	if err := yaml.Unmarshal([]byte(denyClient), ap); err != nil {
		t.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies("demo").Create(ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "the probe client denied on every call", func() error {
		res := probe(t, r, c.Name, 20)
		if res.Failed != 20 || len(res.Errors) == 0 || !strings.Contains(res.Errors[0], "PermissionDenied") {
			return fmt.Errorf("%d of 20 calls failed: %v", res.Failed, res.Errors)
		}
		return nil
	})
	if err := ic.SecurityV1().AuthorizationPolicies("demo").Delete(ctx, ap.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, 30*time.Second, "the probe client served again", func() error {
		if res := probe(t, r, c.Name, 20); res.Failed != 0 {
			return fmt.Errorf("%d of 20 calls failed: %v", res.Failed, res.Errors)
		}
		return nil
	})
}

// TestXDSServerWorkloadsMultiNetwork runs the multi-network scenario with xDS-enabled echo
// pods: calls from each network reach the other's servers through the east-west gateways
// (SNI passthrough), and the mTLS the inbound Listeners ask for ends at the destination
// server with the caller's identity intact.
func TestXDSServerWorkloadsMultiNetwork(t *testing.T) {
	p := provider(t)
	top, err := scenarios.Builtin("multi-network")
	if err != nil {
		t.Fatal(err)
	}
	for i := range top.Workloads {
		top.Workloads[i].XDSServer = true
	}
	r := upTopology(t, top, p)
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("multi-network with xDS-enabled servers failed its checks")
	}
}
