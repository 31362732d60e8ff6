package nodeimage

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/isthmus-mesh/isthmus/internal/engine"
	"github.com/isthmus-mesh/isthmus/internal/kubebin"
)

// Versions of what the image is made of; with Revision they form the image's tag, so a
// change to any of them builds a new image.
const (
	KindVersion    = "v0.33.0"
	CoreDNSVersion = "v1.14.6"
	CrictlVersion  = "v1.37.0"
	Suite          = "bookworm"
	// Revision counts changes to this package's recipe.
	Revision = "1"
)

// Repository is where built node images are tagged (never pushed: the name is local).
const Repository = "isthmus.local/kind-node"

// Ref returns the reference of the node image this package builds.
func Ref() string {
	return Repository + ":" + kubebin.KubernetesVersion + "-kind" + strings.TrimPrefix(KindVersion, "v") + "-" + Suite + "-r" + Revision
}

// Packages are the Debian packages of the node's root (kind's base image list, with
// Debian's containerd, runc and CNI plugins instead of kind's own builds).
var Packages = []string{
	"systemd", "systemd-sysv", "dbus", "iproute2", "iptables", "nftables", "conntrack",
	"ethtool", "socat", "util-linux", "mount", "kmod", "ca-certificates", "procps",
	"containerd", "runc", "containernetworking-plugins", "libseccomp2", "ebtables", "pigz",
	"fuse-overlayfs", "jq", "bash", "e2fsprogs", "curl",
}

// Options say where things come from and go.
type Options struct {
	// Engine holds the image; required.
	Engine *engine.Engine
	// Cache is the cache root (<user cache>/isthmus when ""); binaries and build files
	// live under it.
	Cache string
	// Kube says how to find or build the Kubernetes binaries.
	Kube kubebin.Options
	// Mirror is the Debian mirror; "" means deb.debian.org (through whatever apt uses).
	Mirror string
	// Install lets the build install debootstrap with apt-get when it is missing.
	Install bool
	// Progress receives one line per step; nil discards them.
	Progress func(string)
}

func (o Options) say(format string, args ...any) {
	if o.Progress != nil {
		o.Progress(fmt.Sprintf(format, args...))
	}
}

func (o Options) cache() (string, error) {
	if o.Cache != "" {
		return o.Cache, nil
	}
	ucd, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(ucd, "isthmus"), nil
}

// Present reports whether the engine already holds the node image.
func Present(ctx context.Context, e *engine.Engine) bool {
	return docker(ctx, e, nil, "image", "inspect", "--format", "{{.Id}}", Ref()) == nil
}

// Ensure returns Ref(), building the image first when the engine lacks it.
func Ensure(ctx context.Context, o Options) (string, error) {
	if o.Engine == nil {
		return "", errors.New("nodeimage: no container engine")
	}
	if Present(ctx, o.Engine) {
		return Ref(), nil
	}
	start := time.Now()
	o.say("node image %s: not built yet; building it once (Debian %s, Kubernetes %s, kind %s)", Ref(), Suite, kubebin.KubernetesVersion, KindVersion)
	if err := build(ctx, o); err != nil {
		return "", fmt.Errorf("nodeimage: %w", err)
	}
	o.say("node image %s built in %s", Ref(), time.Since(start).Round(time.Second))
	return Ref(), nil
}

func build(ctx context.Context, o Options) error {
	root, err := o.cache()
	if err != nil {
		return err
	}
	work := filepath.Join(root, "nodeimage", "build")
	if err := os.RemoveAll(work); err != nil {
		return err
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(work)

	// 1. Binaries.
	o.say("node image: Kubernetes binaries")
	kube := o.Kube
	if kube.Progress == nil && o.Progress != nil {
		kube.Progress = lineWriter(o.Progress)
	}
	set, err := kubebin.Ensure(ctx, kube)
	if err != nil {
		return err
	}
	nodeBin, err := kubebin.EnsureNode(ctx, kube)
	if err != nil {
		return err
	}
	tools, err := goTools(ctx, o, filepath.Join(root, "nodeimage", "tools-coredns"+CoreDNSVersion+"-crictl"+CrictlVersion))
	if err != nil {
		return err
	}
	pause := filepath.Join(work, "pause")
	if err := buildPause(ctx, work, pause); err != nil {
		return err
	}

	// 2. The Debian root.
	rootfs := filepath.Join(work, "rootfs")
	if err := debootstrap(ctx, o, rootfs); err != nil {
		return err
	}
	o.say("node image: packing the Debian root")
	baseTar := filepath.Join(work, "base.tar")
	f, err := os.Create(baseTar)
	if err != nil {
		return err
	}
	err = writeDirTar(f, rootfs, func(rel string) bool {
		return rel == "proc" || rel == "sys" || strings.HasPrefix(rel, "var/cache/apt/archives/") ||
			strings.HasPrefix(rel, "usr/share/doc/") || strings.HasPrefix(rel, "usr/share/man/") || strings.HasPrefix(rel, "usr/share/locale/")
	})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pack the root: %w", err)
	}
	base, err := tarball.LayerFromFile(baseTar, tarball.WithCompressionLevel(gzip.BestSpeed))
	if err != nil {
		return err
	}

	// 3. The component images kubeadm will ask for.
	kubeadm := filepath.Join(nodeBin, kubebin.Kubeadm)
	list, err := exec.CommandContext(ctx, kubeadm, "config", "images", "list", "--kubernetes-version", kubebin.KubernetesVersion).Output()
	if err != nil {
		return fmt.Errorf("kubeadm config images list: %w", err)
	}
	binaries := map[string]string{
		"kube-apiserver":          set.APIServer,
		"kube-controller-manager": set.ControllerManager,
		"kube-scheduler":          filepath.Join(nodeBin, kubebin.Scheduler),
		"kube-proxy":              filepath.Join(nodeBin, kubebin.KubeProxy),
		"etcd":                    set.Etcd,
		"coredns":                 filepath.Join(tools, "coredns"),
		"pause":                   pause,
	}
	images := map[name.Tag]v1.Image{}
	var pauseRef string
	for _, ref := range strings.Fields(string(list)) {
		tag, err := name.NewTag(ref)
		if err != nil {
			return fmt.Errorf("kubeadm listed %q: %w", ref, err)
		}
		repo := filepath.Base(tag.RepositoryStr())
		bin, ok := binaries[repo]
		if !ok {
			return fmt.Errorf("kubeadm asks for %s, which this recipe cannot make", ref)
		}
		img, err := componentImage(base, repo, bin)
		if err != nil {
			return fmt.Errorf("%s: %w", ref, err)
		}
		images[tag] = img
		if repo == "pause" {
			pauseRef = ref
		}
	}
	if pauseRef == "" {
		return errors.New("kubeadm lists no pause image")
	}
	imagesTar := filepath.Join(work, "images.tar")
	o.say("node image: writing %d component images", len(images))
	if err := tarball.MultiWriteToFile(imagesTar, images); err != nil {
		return err
	}

	// 4. The node's own layer, then the image, loaded under a build tag.
	kindDir, err := moduleDir(ctx, "sigs.k8s.io/kind@"+KindVersion)
	if err != nil {
		return err
	}
	es, err := nodeEntries(rootfs, kindDir, pauseRef, map[string]string{
		"usr/bin/kubelet":      filepath.Join(nodeBin, kubebin.Kubelet),
		"usr/bin/kubeadm":      kubeadm,
		"usr/bin/kubectl":      set.Kubectl,
		"usr/local/bin/crictl": filepath.Join(tools, "crictl"),
	})
	if err != nil {
		return err
	}
	nodeTar := filepath.Join(work, "node.tar")
	nf, err := os.Create(nodeTar)
	if err != nil {
		return err
	}
	err = writeEntries(nf, es)
	if cerr := nf.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("node layer: %w", err)
	}
	nodeLayer, err := tarball.LayerFromFile(nodeTar)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, base, nodeLayer)
	if err != nil {
		return err
	}
	img, err = mutate.Config(img, v1.Config{
		Entrypoint: []string{"/usr/local/bin/entrypoint", "/sbin/init"},
		Env:        []string{"container=docker", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		StopSignal: "SIGRTMIN+3",
	})
	if err != nil {
		return err
	}
	buildRef := Repository + ":building"
	btag, _ := name.NewTag(buildRef)
	baseImageTar := filepath.Join(work, "node-image.tar")
	o.say("node image: writing and loading the node image")
	if err := tarball.WriteToFile(baseImageTar, btag, img); err != nil {
		return err
	}
	bf, err := os.Open(baseImageTar)
	if err != nil {
		return err
	}
	err = docker(ctx, o.Engine, bf, "load")
	bf.Close()
	if err != nil {
		return err
	}
	defer docker(context.WithoutCancel(ctx), o.Engine, nil, "rmi", buildRef)

	// 5. Import the component images into the node's containerd, then commit.
	return preload(ctx, o, buildRef, imagesTar)
}

// preload runs the node image with containerd (not systemd), imports the component images
// pinned and unpacked lazily (as kind does), and commits the result as Ref().
func preload(ctx context.Context, o Options, buildRef, imagesTar string) error {
	o.say("node image: importing the component images into containerd")
	c := "isthmus-nodeimage-build"
	docker(ctx, o.Engine, nil, "rm", "-f", "-v", c)
	if err := docker(ctx, o.Engine, nil, "run", "-d", "--privileged", "--network", "none", "--name", c, "--entrypoint", "/bin/sleep", buildRef, "infinity"); err != nil {
		return err
	}
	defer docker(context.WithoutCancel(ctx), o.Engine, nil, "rm", "-f", "-v", c)
	if err := docker(ctx, o.Engine, nil, "exec", "-d", c, "sh", "-c", "containerd >/tmp/containerd.log 2>&1"); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for docker(ctx, o.Engine, nil, "exec", c, "ctr", "version") != nil {
		if time.Now().After(deadline) {
			var log bytes.Buffer
			dockerOut(ctx, o.Engine, &log, "exec", c, "cat", "/tmp/containerd.log")
			return fmt.Errorf("containerd in the build container did not start: %s", log.String())
		}
		time.Sleep(300 * time.Millisecond)
	}
	f, err := os.Open(imagesTar)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := docker(ctx, o.Engine, f, "exec", "-i", c, "ctr", "--namespace=k8s.io", "images", "import",
		"--label=io.cri-containerd.pinned=pinned", "--all-platforms", "--no-unpack", "--digests", "-"); err != nil {
		return err
	}
	if err := docker(ctx, o.Engine, nil, "exec", c, "sh", "-c", "pkill containerd; while pgrep containerd >/dev/null; do sleep 0.1; done; rm -f /tmp/containerd.log"); err != nil {
		return err
	}
	return docker(ctx, o.Engine, nil, "commit", "--change", `ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]`, c, Ref())
}

// nodeEntries is the node's layer over the Debian root: kind's base files, the binaries,
// the configuration changes, and the units kind enables and removes.
func nodeEntries(rootfs, kindDir, pauseRef string, bins map[string]string) ([]entry, error) {
	var es []entry
	files := filepath.Join(kindDir, "images", "base", "files")
	err := filepath.Walk(files, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(files, path)
		mode := int64(0o644)
		if strings.HasPrefix(rel, "usr/local/bin/") || strings.HasPrefix(rel, "kind/bin/") {
			mode = 0o755
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if rel == "etc/containerd/config.toml" {
			if data, err = containerdConfig(data, pauseRef); err != nil {
				return err
			}
		}
		if rel == "etc/default/kubelet" {
			data = []byte(strings.TrimSpace(string(data)) + " --fail-cgroupv1=false\n")
		}
		es = append(es, entry{Name: rel, Mode: mode, Data: data})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("kind's base files in %s: %w", files, err)
	}
	for dst, src := range bins {
		es = append(es, entry{Name: dst, Mode: 0o755, Source: src})
	}
	es = append(es,
		entry{Name: "kind/version", Mode: 0o644, Data: []byte(kubebin.KubernetesVersion)},
		entry{Name: "etc/kubernetes/manifests", Dir: true, Mode: 0o755},
		entry{Name: "etc/cni/net.d", Dir: true, Mode: 0o755},
		entry{Name: "opt/cni/bin", Link: "/usr/lib/cni"},
		entry{Name: "etc/systemd/system/systemd-binfmt.service", Link: "/dev/null"},
	)
	journald, err := os.ReadFile(filepath.Join(rootfs, "etc/systemd/journald.conf"))
	if err != nil {
		return nil, err
	}
	es = append(es, entry{Name: "etc/systemd/journald.conf", Mode: 0o644, Data: append(journald, []byte("ReadKMsg=no\n")...)})
	// What kind's Dockerfile removes: units no container should start.
	for _, glob := range []string{
		"lib/systemd/system/multi-user.target.wants/*", "etc/systemd/system/*.wants/*",
		"lib/systemd/system/local-fs.target.wants/*", "lib/systemd/system/sockets.target.wants/*udev*",
		"lib/systemd/system/sockets.target.wants/*initctl*", "lib/systemd/system/basic.target.wants/*",
		"lib/systemd/system/sysinit.target.wants/systemd-tmpfiles-setup.service",
	} {
		matches, _ := filepath.Glob(filepath.Join(rootfs, glob))
		for _, m := range matches {
			rel, _ := filepath.Rel(rootfs, m)
			es = append(es, entry{Name: rel, Whiteout: true})
		}
	}
	for _, unit := range []string{"kubelet.service", "containerd.service", "undo-mount-hacks.service"} {
		es = append(es, entry{Name: "etc/systemd/system/multi-user.target.wants/" + unit, Link: "/etc/systemd/system/" + unit})
	}
	return es, nil
}

var sandboxImage = regexp.MustCompile(`(?m)^(\s*sandbox_image\s*=\s*)".*"`)
var restrictOOM = regexp.MustCompile(`(?m)^(\s*restrict_oom_score_adj\s*=\s*)false`)
var baseSpec = regexp.MustCompile(`(?m)^\s*base_runtime_spec\s*=.*\n`)

// containerdConfig adapts kind's containerd configuration: OOM score adjustments restricted
// (they need CAP_SYS_RESOURCE), the sandbox image kubeadm lists, and containerd's default
// runtime spec (kind generates its own at build time with tools this recipe lacks).
func containerdConfig(b []byte, pauseRef string) ([]byte, error) {
	s := string(b)
	if !sandboxImage.MatchString(s) || !restrictOOM.MatchString(s) {
		return nil, errors.New("kind's containerd config.toml has no sandbox_image or restrict_oom_score_adj line to set; the recipe needs updating for this kind version")
	}
	s = sandboxImage.ReplaceAllString(s, `${1}"`+pauseRef+`"`)
	s = restrictOOM.ReplaceAllString(s, "${1}true")
	s = baseSpec.ReplaceAllString(s, "")
	return []byte(s), nil
}

// componentImage is base plus one layer with the binary where the component's image has
// it: /usr/local/bin for the Kubernetes components and etcd (kubeadm's manifests name the
// command), /coredns and /pause as entrypoints.
func componentImage(base v1.Layer, repo, bin string) (v1.Image, error) {
	dst, cfg := "usr/local/bin/"+repo, v1.Config{Env: []string{"PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}}
	switch repo {
	case "coredns":
		dst, cfg.Entrypoint = "coredns", []string{"/coredns"}
	case "pause":
		dst, cfg.Entrypoint = "pause", []string{"/pause"}
	case "etcd":
		dst = "usr/local/bin/etcd"
	}
	var buf bytes.Buffer
	if err := writeEntries(&buf, []entry{{Name: dst, Mode: 0o755, Source: bin}}); err != nil {
		return nil, err
	}
	data := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, base, l)
	if err != nil {
		return nil, err
	}
	return mutate.Config(img, cfg)
}

// debootstrap makes the Debian root (as root; it needs chroot and mknod).
func debootstrap(ctx context.Context, o Options, dir string) error {
	if _, err := exec.LookPath("debootstrap"); err != nil {
		if !o.Install {
			return errors.New("debootstrap is not installed: apt-get install debootstrap")
		}
		o.say("node image: installing debootstrap")
		cmd := exec.CommandContext(ctx, "apt-get", "install", "-y", "-qq", "debootstrap")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("apt-get install debootstrap: %v: %s", err, lastLines(string(out), 10))
		}
	}
	mirror := o.Mirror
	if mirror == "" {
		mirror = "http://deb.debian.org/debian"
	}
	o.say("node image: debootstrap %s from %s (about 3 minutes)", Suite, mirror)
	cmd := exec.CommandContext(ctx, "debootstrap", "--variant=minbase", "--include="+strings.Join(Packages, ","), Suite, dir, mirror)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("debootstrap: %v: %s", err, lastLines(out.String(), 15))
	}
	return nil
}

// goTools builds coredns and crictl from their modules into dir (once).
func goTools(ctx context.Context, o Options, dir string) (string, error) {
	bin := filepath.Join(dir, "bin")
	if ok(filepath.Join(bin, "coredns")) && ok(filepath.Join(bin, "crictl")) {
		return bin, nil
	}
	tmp := dir + ".building"
	os.RemoveAll(tmp)
	for _, pkg := range []string{"github.com/coredns/coredns@" + CoreDNSVersion, "sigs.k8s.io/cri-tools/cmd/crictl@" + CrictlVersion} {
		o.say("node image: go install %s", pkg)
		cmd := exec.CommandContext(ctx, "go", "install", "-ldflags", "-s -w", pkg)
		cmd.Env = append(os.Environ(), "GOBIN="+filepath.Join(tmp, "bin"), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
		cmd.Dir = os.TempDir()
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go install %s: %v: %s", pkg, err, lastLines(string(out), 15))
		}
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return bin, nil
}

func buildPause(ctx context.Context, work, out string) error {
	src := filepath.Join(work, "pause-src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		return err
	}
	os.WriteFile(filepath.Join(src, "go.mod"), []byte("module pause\n\ngo 1.22\n"), 0o644)
	if err := os.WriteFile(filepath.Join(src, "main.go"), []byte(pauseSource), 0o644); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-ldflags", "-s -w", "-o", out, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %v: %s", err, b)
	}
	return nil
}

// moduleDir downloads a module (through GOPROXY) and returns its directory.
func moduleDir(ctx context.Context, mod string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", mod)
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=", "GO111MODULE=on")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w", mod, err)
	}
	var m struct{ Dir, Error string }
	if err := json.Unmarshal(out, &m); err != nil || m.Dir == "" {
		return "", fmt.Errorf("go mod download %s: %s %v", mod, m.Error, err)
	}
	return m.Dir, nil
}

func ok(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode()&0o111 != 0
}

func docker(ctx context.Context, e *engine.Engine, stdin io.Reader, args ...string) error {
	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), e.Env())
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdin, &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, lastLines(out.String(), 10))
	}
	return nil
}

func dockerOut(ctx context.Context, e *engine.Engine, w io.Writer, args ...string) error {
	cmd := exec.CommandContext(ctx, "docker", args...)
	cmd.Env = append(os.Environ(), e.Env())
	cmd.Stdout, cmd.Stderr = w, w
	return cmd.Run()
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// lineWriter turns a per-line callback into an io.Writer for the binary builds' progress.
func lineWriter(f func(string)) io.Writer {
	pr, pw := io.Pipe()
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			f(sc.Text())
		}
	}()
	return pw
}
