package scenarios_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/scenarios"
)

// TestIngress runs the ingress scenario: proxyless gRPC reachability inside the mesh,
// then curl from a namespace outside every mesh network through `isthmus proxy --mode
// ingress` — HTTPS by SNI with the certificate of the Gateway's credentialName Secret,
// /v1 to cluster-1's pods, /v2 across network-2's east-west gateway, HTTP/2, 404s, the
// HTTP→HTTPS redirect, MUTUAL with and without a client certificate, and refused
// handshakes, each counted in the proxy's metrics. The
// backends see the ingress's own SPIFFE identity (mTLS from the ingress to the pod). A
// wrong expectation then fails with its reason.
func TestIngress(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("the ingress scenario needs network namespaces, so root (CI runs as root)")
	}
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("the ingress checks need curl; .ci/run installs it")
	}
	r := up(t, "ingress", p)
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("reachability failed before the ingress")
	}
	ctx := context.Background()
	start := time.Now()
	rep, err := r.RunIngress(ctx, scenarios.IngressOptions{Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	rep.WriteTable(&b)
	t.Logf("ingress checks in %.1fs\n%s", time.Since(start).Seconds(), b.String())
	if !rep.Passed || len(rep.Checks) != len(r.Topology.Ingress.Checks) {
		t.Fatalf("ingress checks failed: %+v", rep.Checks)
	}

	// The refusals and answers are in the proxy's metrics.
	resp, err := http.Get("http://" + r.Ingress.Addresses["http"] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`isthmus_proxy_refused_total{reason="no_sni"}`, `isthmus_proxy_refused_total{reason="unknown_sni"}`,
		`isthmus_proxy_refused_total{reason="no_route"}`, `isthmus_proxy_refused_total{reason="unknown_host"}`,
		`isthmus_proxy_refused_total{reason="bad_tls"}`} { // bad_tls: the MUTUAL handshakes without a client certificate
		m := regexp.MustCompile(regexp.QuoteMeta(want) + ` (\d+)`).FindSubmatch(body)
		if m == nil {
			t.Errorf("metric %s missing", want)
			continue
		}
		if n, _ := strconv.Atoi(string(m[1])); n < 1 {
			t.Errorf("metric %s = %d, want ≥ 1", want, n)
		}
	}

	// A wrong expectation fails, naming the cluster that answered.
	wrong := r.Topology.Ingress.Checks[0]
	wrong.Clusters = []string{"cluster-2"}
	r.Topology.Ingress.Checks = []scenarios.IngressCheck{wrong}
	rep, err = r.RunIngress(ctx, scenarios.IngressOptions{Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Passed || !strings.Contains(strings.Join(rep.Checks[0].Reasons, ";"), "cluster-1 answered and must not") {
		t.Fatalf("a wrong expectation passed or gave no reason: %+v", rep.Checks)
	}
}
