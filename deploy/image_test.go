package deploy

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// staticBinary builds testdata/hello with CGO_ENABLED=0 and the version linked in as the
// release build does.
func staticBinary(t *testing.T, version string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "hello")
	cmd := exec.Command("go", "build", "-o", out, "-ldflags", "-X main.version="+version, "./testdata/hello")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestImageTarballReadsBack writes the image as kind and docker load it and reads it back
// with go-containerregistry: the tag, the config (entrypoint, non-root user, platform,
// labels) and the one layer's files.
func TestImageTarballReadsBack(t *testing.T) {
	bin := staticBinary(t, "v1.2.3")
	if got := BinaryVersion(bin); got != "v1.2.3" {
		t.Fatalf("BinaryVersion = %q, want v1.2.3", got)
	}
	img, err := BuildImage(ImageConfig{Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "isthmus.tar")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tag := DefaultImageTag(img.Version)
	if err := WriteImageTarball(f, img, tag); err != nil {
		t.Fatal(err)
	}
	f.Close()

	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(path) })
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || len(m[0].RepoTags) != 1 || m[0].RepoTags[0] != "isthmus:v1.2.3" {
		t.Fatalf("manifest %+v, want one image tagged isthmus:v1.2.3", m)
	}
	back, err := tarball.ImageFromPath(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := back.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s, want linux/%s", cf.OS, cf.Architecture, runtime.GOARCH)
	}
	if strings.Join(cf.Config.Entrypoint, " ") != "/isthmus" || cf.Config.User != "65532:65532" {
		t.Errorf("entrypoint %v user %q, want [/isthmus] and 65532:65532", cf.Config.Entrypoint, cf.Config.User)
	}
	for k, want := range map[string]string{ImageLabelTitle: "isthmus", ImageLabelVersion: "v1.2.3", ImageLabelSource: ImageSource} {
		if cf.Config.Labels[k] != want {
			t.Errorf("label %s = %q, want %q", k, cf.Config.Labels[k], want)
		}
	}
	layers, err := back.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers %d (%v), want 1", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]*tar.Header{}
	contents := map[string][]byte{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = h
		contents[h.Name], _ = io.ReadAll(tr)
	}
	if h := files["isthmus"]; h == nil || h.Mode != 0o755 || !bytes.Equal(contents["isthmus"], bin) {
		t.Errorf("layer has no executable /isthmus equal to the binary (%+v)", h)
	}
	if !strings.Contains(string(contents["etc/passwd"]), "isthmus:x:65532:65532:") || !strings.Contains(string(contents["etc/group"]), "isthmus:x:65532:") {
		t.Errorf("passwd/group do not name user 65532: %q %q", contents["etc/passwd"], contents["etc/group"])
	}
	if h := files["tmp/"]; h == nil || h.Mode != 0o1777 {
		t.Errorf("no world-writable sticky /tmp: %+v", h)
	}

	// Same binary, same image: the digest is reproducible (no clock, no owner, no order).
	again, err := BuildImage(ImageConfig{Binary: bin})
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("digests %s and %s of the same binary differ", d1, d2)
	}
}

func TestImageRefusals(t *testing.T) {
	if _, err := BuildImage(ImageConfig{}); err == nil || !strings.Contains(err.Error(), "no binary") {
		t.Errorf("empty binary: %v", err)
	}
	if _, err := BuildImage(ImageConfig{Binary: []byte("#!/bin/sh\necho hi\n")}); err == nil || !strings.Contains(err.Error(), "not an ELF executable") {
		t.Errorf("script: %v", err)
	}
	// A dynamically linked system binary (Debian's are) needs a C library the image lacks.
	if dyn, err := os.ReadFile("/bin/ls"); err == nil {
		if _, err := BuildImage(ImageConfig{Binary: dyn}); err == nil || !strings.Contains(err.Error(), "CGO_ENABLED=0") {
			t.Errorf("dynamic binary: %v, want the CGO_ENABLED=0 advice", err)
		}
	}
	if err := WriteImageTarball(io.Discard, nil, "Not A Tag!"); err == nil || !strings.Contains(err.Error(), `tag "Not A Tag!"`) {
		t.Errorf("bad tag: %v", err)
	}
	for in, want := range map[string]string{"v1.2.3": "isthmus:v1.2.3", "dev": "isthmus:dev", "v1+dirty/x": "isthmus:v1-dirty-x", "-x": "isthmus:v-x"} {
		if got := DefaultImageTag(in); got != want {
			t.Errorf("DefaultImageTag(%q) = %q, want %q", in, got, want)
		}
	}
}
