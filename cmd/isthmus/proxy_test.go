package main

import (
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/primary"
)

// TestProxyFlagsRefusedBeforeAnythingStarts: bad flags are refused with the flag's name
// and what to do, before any listener or connection exists.
func TestProxyFlagsRefusedBeforeAnythingStarts(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"proxy", "--mode", "sidecar", "--network", "n1", "--cluster-id", "c1"}, "--mode sidecar is not built yet"},
		{[]string{"proxy", "--mode", "egress", "--network", "n1", "--cluster-id", "c1"}, `--mode "egress"`},
		{[]string{"proxy", "--network", "bad network", "--cluster-id", "c1"}, "--network"},
		{[]string{"proxy", "--network", "n1", "--cluster-id", "c1", "--listen-address", "nope"}, "--listen-address"},
		{[]string{"proxy", "--network", "n1", "--cluster-id", "c1", "--service-account", "nope", "--xds-root-cert", "/nonexistent"}, "--service-account"},
		{[]string{"proxy", "--network", "n1", "--cluster-id", "c1"}, "secure xDS needs --xds-root-cert"},
		{[]string{"proxy", "--cluster-id", "c1"}, `"network" not set`},
	} {
		_, _, err := runRoot(t, append(c.args, "--http-address", "127.0.0.1:0")...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v, want an error with %q", c.args, err, c.want)
		}
	}
}

// TestIngressNodeIsAnIngressToThePrimary: the node the proxy sends is one the primary's
// strict decoder accepts as a router in the service account's namespace, and its labels
// make it an ingress (not an east-west gateway).
func TestIngressNodeIsAnIngressToThePrimary(t *testing.T) {
	n, err := ingressNode("100.120.1.1", "istio-ingressgateway", "istio-system", "network-1", "cluster-1", map[string]string{"istio": "ingressgateway", "app": "in"})
	if err != nil {
		t.Fatal(err)
	}
	claim, err := primary.DecodeNode(n)
	if err != nil {
		t.Fatal(err)
	}
	if claim.Kind != primary.ProxyGateway || claim.Namespace != "istio-system" || claim.Pod != "istio-ingressgateway" {
		t.Fatalf("claim %+v", claim)
	}
	labels := n.GetMetadata().GetFields()[primary.MetaLabels].GetStructValue().GetFields()
	if labels["istio"].GetStringValue() != "ingressgateway" || labels["app"].GetStringValue() != "in" {
		t.Fatalf("labels %v", labels)
	}
	if _, err := ingressNode("0.0.0.0", "", "istio-system", "n", "c", map[string]string{"a": "b"}); err == nil {
		t.Fatal("an empty pod name was accepted")
	}
}
