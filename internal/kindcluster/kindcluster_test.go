package kindcluster

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/engine"
	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/nodeimage"
	"github.com/isthmus-mesh/isthmus/internal/uplinkguard"
)

func TestValidate(t *testing.T) {
	good := Spec{Name: "c1", Network: "n1", Subnet: "10.213.1.0/24", PodSubnet: "10.214.0.0/16", ServiceSubnet: "10.215.0.0/16", NodeImage: "i", Dir: "/tmp/x"}
	if err := validate(good); err != nil {
		t.Fatal(err)
	}
	bad := good
	bad.Subnet = "fd00::/64"
	if err := validate(bad); err == nil || !strings.Contains(err.Error(), "Subnet") {
		t.Fatalf("IPv6 subnet: %v", err)
	}
	bad = good
	bad.Name = ""
	if err := validate(bad); err == nil {
		t.Fatal("empty name accepted")
	}
}

// TestCreateFromLocalNodeImage builds the node image from Debian's packages and Go modules
// (once; cached in the engine's store), starts one kind cluster on a network of its own,
// and checks that the node is Ready and CoreDNS runs (so the preloaded images, the CNI
// configuration and the kubelet all work), then deletes everything but the image.
func TestCreateFromLocalNodeImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a node image and starts a kind cluster")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := exec.LookPath("dockerd"); err != nil {
		t.Skip("docker.io is not installed (.ci/run installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Minute)
	defer cancel()
	say := func(s string) { t.Log(s) }
	g, err := uplinkguard.New()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Install(); err != nil {
		t.Fatal(err)
	}
	defer g.Remove()
	ucd, _ := os.UserCacheDir()
	e, err := engine.Start(ctx, engine.Options{Dir: filepath.Join(ucd, "isthmus", "docker"), Guard: g, Install: true, Progress: say})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Stop()
	img, err := nodeimage.Ensure(ctx, nodeimage.Options{Engine: e, Kube: kubebin.OptionsFromEnv(), Install: true, Progress: say})
	if err != nil {
		t.Fatal(err)
	}
	s := Spec{Name: "isthmus-kindtest", Network: "isthmus-kindtest", Subnet: "10.213.250.0/24",
		PodSubnet: "10.214.0.0/16", ServiceSubnet: "10.215.0.0/16", NodeImage: img, Dir: t.TempDir()}
	c, err := Create(ctx, e, g, s, say)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := Delete(e, c); err != nil {
			t.Error(err)
		}
		if err := DeleteNetwork(context.Background(), e, s.Network); err != nil {
			t.Error(err)
		}
	}()
	set, err := kubebin.Ensure(ctx, kubebin.OptionsFromEnv())
	if err != nil {
		t.Fatal(err)
	}
	kubectl := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, set.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=120s"); err != nil {
		t.Fatalf("node not Ready: %v: %s", err, out)
	}
	if out, err := kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", "--timeout=180s"); err != nil {
		pods, _ := kubectl("-n", "kube-system", "get", "pods", "-o", "wide")
		events, _ := kubectl("-n", "kube-system", "get", "events", "--sort-by=.lastTimestamp")
		t.Fatalf("coredns did not roll out: %v: %s\n%s\n%s", err, out, pods, events)
	}
	if err := g.Check(); err != nil {
		t.Fatalf("with a kind cluster running: %v", err)
	}
}
