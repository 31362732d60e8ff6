package scenarios_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// TestMeshTenancy runs the mesh-tenancy scenario: two meshes of two clusters each (a
// primary per cluster; the second follows the first's federation endpoint), the same
// echo.demo and private.demo in all four clusters. The scenario's check: each mesh's
// echo.demo answers from its own two clusters only; mesh-a's exported echo.demo answers
// clients in both of mesh-b's clusters from both of mesh-a's, with the caller's b.example
// identity; nothing else crosses. Both of mesh-b's primaries serve the import and both of
// its clusters hold its ServiceImport. Then, on the same clusters: unexporting and
// deleting the peering isolate the meshes again (both of mesh-b's clusters lose the
// import); a new peering alone does not make echo reachable; the export does, from both
// clusters again.
func TestMeshTenancy(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("mesh-tenancy needs network namespaces (root)")
	}
	ctx := context.Background()
	r := up(t, "mesh-tenancy", p)
	if rep := check(t, r, scenarios.CheckOptions{Timeout: 90 * time.Second}); !rep.Passed {
		t.Fatal("mesh-tenancy failed")
	}
	importing := []string{"cluster-b1", "cluster-b2"}
	const importName = "echo.demo.svc.mesh-a.isthmus"

	// Both primaries of mesh-b serve the import; both clusters show it as a ServiceImport.
	for _, c := range importing {
		body := registryz(t, r, c)
		if !strings.Contains(body, importName) {
			t.Errorf("%s's registry has no %s", c, importName)
		}
		mc := mcsOf(t, r, c)
		si, err := mc.MulticlusterV1alpha1().ServiceImports("demo").Get(ctx, federation.ServiceImportName("mesh-a", mesh.ServiceKey{Namespace: "demo", Name: "echo"}), metav1.GetOptions{})
		if err != nil {
			t.Errorf("%s: ServiceImport: %v", c, err)
		} else if si.Annotations[federation.AnnotationHostname] != importName {
			t.Errorf("%s: ServiceImport %s names %q", c, si.Name, si.Annotations[federation.AnnotationHostname])
		}
	}

	gone := func(what string) {
		t.Helper()
		start := time.Now()
		for _, c := range importing {
			var reason string
			kubetest.Eventually(t, 60*time.Second, what+" from "+c, func() error {
				res, err := importProbe(t, r, c, importName+":8080")
				if err != nil {
					return err
				}
				if len(res.Answers) > 0 || len(res.Errors) == 0 {
					return fmt.Errorf("still answered by %+v", res.Answers)
				}
				reason = res.Errors[0]
				return nil
			})
			t.Logf("%s from %s: %s; the call fails with: %s", what, c, time.Since(start).Round(time.Millisecond), reason)
		}
	}
	// isolated is the scenario's expectations with mesh-a's echo unreachable from mesh-b.
	isolated := slices.Clone(r.Topology.Expect)
	for i, e := range isolated {
		if e.Mesh == "mesh-a" && e.Service == "echo.demo" {
			isolated[i].Reach, isolated[i].CallerIdentity = []string{}, ""
		}
	}

	if err := r.Unexport(ctx, "mesh-a", "echo.demo"); err != nil {
		t.Fatal(err)
	}
	gone("unexported echo.demo gone")
	for _, d := range [][2]string{{"mesh-a", "mesh-b"}, {"mesh-b", "mesh-a"}} {
		if err := r.DeletePeering(ctx, d[0], d[1]); err != nil {
			t.Fatalf("delete %s's peering with %s: %v", d[0], d[1], err)
		}
	}
	// A peering alone does not make anything reachable: nothing is exported.
	if err := r.Peer(ctx, "mesh-b", "mesh-a"); err != nil {
		t.Fatal(err)
	}
	if rep := check(t, r, scenarios.CheckOptions{Timeout: 60 * time.Second, Expect: isolated}); !rep.Passed {
		t.Fatal("peered but nothing exported: the meshes must stay isolated, each serving its own echo.demo")
	}
	for _, c := range importing {
		kubetest.Eventually(t, 20*time.Second, c+"'s registry without the import", func() error {
			if strings.Contains(registryz(t, r, c), importName) {
				return fmt.Errorf("%s still in the registry", importName)
			}
			return nil
		})
	}
	// The export: reachable from both of mesh-b's clusters again.
	start := time.Now()
	if err := r.Export(ctx, "mesh-a", "echo.demo", []string{"mesh-b"}); err != nil {
		t.Fatal(err)
	}
	if rep := check(t, r, scenarios.CheckOptions{Timeout: 90 * time.Second}); !rep.Passed {
		t.Fatal("mesh-tenancy failed after export, delete, peer and export again")
	}
	t.Logf("export → every cell of the scenario passing again: %s", time.Since(start).Round(time.Millisecond))
}

func registryz(t *testing.T, r *scenarios.Run, cluster string) string {
	t.Helper()
	resp, err := http.Get("http://" + r.Primaries[cluster].Addresses["http"] + "/debug/registryz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func mcsOf(t *testing.T, r *scenarios.Run, cluster string) mcsclient.Interface {
	t.Helper()
	for _, c := range r.Env.Clusters() {
		if c.Name == cluster {
			mc, err := mcsclient.NewForConfig(c.REST)
			if err != nil {
				t.Fatal(err)
			}
			return mc
		}
	}
	t.Fatalf("no cluster %s", cluster)
	return nil
}
