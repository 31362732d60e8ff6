package remote_test

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/remote"
)

// TestIstioRightsExtendTheReader: --rights istio keeps every reader rule, adds only list
// and watch, and is refused for a config cluster and for unknown values before anything
// is written.
func TestIstioRightsExtendTheReader(t *testing.T) {
	reader, istio := remote.ReaderRules(), remote.IstioReaderRules()
	for i, r := range reader {
		if !slices.Equal(r.Resources, istio[i].Resources) || !slices.Equal(r.Verbs, istio[i].Verbs) {
			t.Fatalf("rule %d differs: %+v vs %+v", i, r, istio[i])
		}
	}
	for _, r := range append(istio[len(reader):], remote.IstioNamespaceRules()...) {
		if !slices.Equal(r.Verbs, []string{"list", "watch"}) {
			t.Errorf("added rule %+v is not list/watch only", r)
		}
	}
	for _, tc := range []struct {
		opts remote.CreateOptions
		want string
	}{
		{remote.CreateOptions{Cluster: "c", Rights: "admin"}, `rights "admin" (want "isthmus" or "istio")`},
		{remote.CreateOptions{Cluster: "c", Rights: remote.RightsIstio, Type: remote.TypeConfig}, "needs its own installation's RBAC"},
	} {
		// A nil client: the options must be refused before the cluster is touched.
		if _, err := remote.Create(context.Background(), nil, nil, tc.opts); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.opts, err, tc.want)
		}
	}
}

// TestCreateIstioRights: on a real API server the --rights istio reader may list and
// watch what istiod's remote controller reads (ConfigMaps only in istio-system), still
// nothing else; running create again
// with the default rights takes the extra rights away.
func TestCreateIstioRights(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	c := shared[1]
	opts := remote.CreateOptions{Cluster: "istio-2", Rights: remote.RightsIstio, ServiceAccount: "istiod-reader"}
	created, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), opts)
	if err != nil {
		t.Fatal(err)
	}
	reader := readerClient(t, created.Secret)
	for _, ok := range []struct{ verb, group, resource, ns string }{
		{"list", "", "services", ""}, {"watch", "discovery.k8s.io", "endpointslices", ""},
		{"list", "", "configmaps", "istio-system"}, {"watch", "", "configmaps", "istio-system"}, {"watch", "", "secrets", "demo"}, {"list", "", "secrets", ""},
		{"list", "apiextensions.k8s.io", "customresourcedefinitions", ""}, {"create", "authentication.k8s.io", "tokenreviews", ""},
	} {
		if !can(t, reader, ok.verb, ok.group, ok.resource, ok.ns) {
			t.Errorf("may not %s %s/%s in %q", ok.verb, ok.group, ok.resource, ok.ns)
		}
	}
	for _, no := range []struct{ verb, group, resource, ns string }{
		{"get", "", "secrets", "istio-system"}, {"list", "", "configmaps", ""}, {"list", "", "configmaps", "default"},
		{"create", "", "configmaps", "istio-system"}, {"update", "", "configmaps", "istio-system"},
		{"list", "networking.istio.io", "virtualservices", ""}, {"create", "apiextensions.k8s.io", "customresourcedefinitions", ""},
	} {
		if can(t, reader, no.verb, no.group, no.resource, no.ns) {
			t.Errorf("may %s %s/%s in %q", no.verb, no.group, no.resource, no.ns)
		}
	}
	opts.Rights = ""
	if _, err := remote.Create(ctx, admin(t, c), c.RESTConfig(), opts); err != nil {
		t.Fatal(err)
	}
	if can(t, reader, "list", "", "secrets", "") || can(t, reader, "list", "", "configmaps", "istio-system") {
		t.Error("create with the default rights left istiod's extra rights in place")
	}
}
