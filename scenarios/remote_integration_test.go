package scenarios_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// remoteProxies returns the proxies of cluster connected to the primary at httpAddr.
func remoteProxies(t *testing.T, httpAddr, cluster string) []primary.Proxy {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/debug/clusterz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cz primary.ClusterzResponse
	if err := json.NewDecoder(resp.Body).Decode(&cz); err != nil {
		t.Fatal(err)
	}
	var out []primary.Proxy
	for _, p := range cz.Proxies {
		if string(p.Cluster) == cluster {
			out = append(out, p)
		}
	}
	return out
}

// waitProxies polls until ok(cluster's proxies) holds, or fails after timeout.
func waitProxies(t *testing.T, httpAddr, cluster string, timeout time.Duration, what string, ok func([]primary.Proxy) bool) []primary.Proxy {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ps := remoteProxies(t, httpAddr, cluster)
		if ok(ps) {
			return ps
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: after %s the primary has %+v", what, timeout, ps)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestPrimaryRemote runs the primary-remote scenario: cluster-2 has no control plane; its
// pods and gateway reach cluster-1's primary through network-1's gateway, authenticated
// in cluster-2. Stopping that gateway cuts their xDS while calls inside cluster-2 go on;
// a new gateway restores the streams without restarting any workload.
func TestPrimaryRemote(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("primary-remote runs on two networks, which need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "primary-remote", p)
	if _, ok := r.Primaries["cluster-2"]; ok {
		t.Fatal("the remote cluster runs a primary")
	}
	if got := r.ControlPlaneOf("cluster-2"); !strings.Contains(got, "primary of cluster-1 via istiod.istio-system.svc in cluster-2") || !strings.Contains(got, "gateway of network-1") {
		t.Fatalf("cluster-2's control plane: %s", got)
	}
	rep := check(t, r, scenarios.CheckOptions{})
	if !rep.Passed {
		t.Fatal("primary-remote failed")
	}
	if !strings.Contains(rep.ControlPlanes["cluster-2"], "gateway of network-1") || !strings.Contains(rep.ControlPlanes["cluster-1"], "direct") {
		t.Errorf("the report's control planes: %v", rep.ControlPlanes)
	}
	c := cell(t, rep, "cluster-2", "echo.demo")
	if fmt.Sprint(c.Answered) != "[cluster-1 (gateway network-1) cluster-2 (direct)]" {
		t.Errorf("cluster-2's answers %v", c.Answered)
	}
	httpAddr := r.Primaries["cluster-1"].Addresses["http"]
	// The remote's client authenticated with its certificate (its pod in cluster-2 vouches
	// for the cluster) and the remote's gateway with a token reviewed in cluster-2.
	ps := waitProxies(t, httpAddr, "cluster-2", 30*time.Second, "the remote's proxies", func(ps []primary.Proxy) bool {
		var client, gw bool
		for _, p := range ps {
			via := p.Path == "via gateway network-1"
			client = client || (via && p.Identity == r.Identity(scenarios.ClientNamespace, scenarios.ClientServiceAccount) && p.Auth == primary.AuthCertificate && p.Network == "network-2")
			gw = gw || (via && p.Kind == primary.ProxyGateway && p.Auth == primary.AuthToken && p.Identity == r.Identity(scenarios.SystemNamespace, scenarios.GatewayServiceAccount))
		}
		return client && gw
	})
	t.Logf("the remote's proxies at the primary: %+v", ps)

	// Without network-1's gateway the remote has no control plane: its streams end. Its
	// pods keep their last configuration and certificates, so calls inside cluster-2 go on.
	if err := r.StopGateway("network-1"); err != nil {
		t.Fatal(err)
	}
	waitProxies(t, httpAddr, "cluster-2", 30*time.Second, "streams through the stopped gateway", func(ps []primary.Proxy) bool { return len(ps) == 0 })
	inside := []scenarios.Expectation{{From: "cluster-2", Service: "echo.demo", Reach: []string{"cluster-2"}}}
	if rep := check(t, r, scenarios.CheckOptions{Expect: inside, Timeout: 30 * time.Second}); !rep.Passed {
		t.Fatal("calls between known endpoints inside the remote stopped with its control plane")
	}
	// A new gateway: the same pods reconnect on their own.
	if err := r.RestartGateway(context.Background(), "network-1"); err != nil {
		t.Fatal(err)
	}
	waitProxies(t, httpAddr, "cluster-2", 60*time.Second, "streams after the gateway came back", func(ps []primary.Proxy) bool {
		for _, p := range ps {
			if p.Kind == primary.ProxyGateway {
				return true
			}
		}
		return false
	})
	if rep := check(t, r, scenarios.CheckOptions{Timeout: 60 * time.Second}); !rep.Passed {
		t.Fatal("the mesh did not recover with a new gateway")
	}
}

// TestExternalControlPlane runs the external-control-plane scenario: the control plane
// holds only cluster-1's config credential, and serves both clusters.
func TestExternalControlPlane(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("external-control-plane runs on two networks, which need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "external-control-plane", p)
	if got := r.ControlPlaneOf("cluster-1"); !strings.Contains(got, "external control plane of config cluster cluster-1") {
		t.Fatalf("cluster-1's control plane: %s", got)
	}
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("external-control-plane failed")
	}
	// Its credential for the config cluster reads no secret one by one and writes nothing.
	rc, err := clientcmd.BuildConfigFromFlags("", r.ExternalCredentials["cluster-1"])
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := cs.CoreV1().Secrets("istio-system").Get(ctx, "cacerts", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the external control plane's credential may get a secret: %v", err)
	}
	if _, err := cs.CoreV1().ConfigMaps("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("the external control plane's credential may list configmaps: %v", err)
	}
	httpAddr := r.Primaries["cluster-1"].Addresses["http"]
	waitProxies(t, httpAddr, "cluster-2", 30*time.Second, "the remote's proxies", func(ps []primary.Proxy) bool { return len(ps) >= 2 })
	waitProxies(t, httpAddr, "cluster-1", 30*time.Second, "the config cluster's proxies", func(ps []primary.Proxy) bool { return len(ps) >= 2 })
}
