package deploy

import (
	"archive/tar"
	"bytes"
	"debug/buildinfo"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// ImageUID is the user (and group) the image runs as: not root, and the UID distroless
// images use for "nonroot", so volume permissions written for those work here.
const ImageUID = 65532

// ImageBinaryPath is where the binary sits in the image; it is the entrypoint.
const ImageBinaryPath = "/isthmus"

// Image labels (OCI annotation keys, set as config labels).
const (
	ImageLabelTitle   = "org.opencontainers.image.title"
	ImageLabelVersion = "org.opencontainers.image.version"
	ImageLabelSource  = "org.opencontainers.image.source"
)

// ImageSource is the project's source, for the image's source label.
const ImageSource = "https://github.com/isthmus-mesh/isthmus"

// ImageConfig says what image to build.
type ImageConfig struct {
	// Binary is the isthmus executable: a statically linked ELF file (CGO_ENABLED=0),
	// since the image has no C library. Required.
	Binary []byte
	// Version labels the image; default: the version linked into Binary (-X
	// main.version=...), else "dev".
	Version string
	// Created is the image's creation time; default the Unix epoch, so that the same
	// binary always gives the same image digest.
	Created time.Time
}

// Image is a built image and what it was built from.
type Image struct {
	v1.Image
	// Version is the version the image is labelled with.
	Version string
	// Platform is the binary's OS and architecture.
	Platform v1.Platform
}

// BuildImage builds the isthmus image: one layer holding the binary at ImageBinaryPath,
// /etc/passwd and /etc/group naming user isthmus (ImageUID), and a world-writable /tmp;
// the config's entrypoint is the binary, its user ImageUID and its labels the title,
// version and source. No daemon or registry is involved.
func BuildImage(cfg ImageConfig) (*Image, error) {
	if len(cfg.Binary) == 0 {
		return nil, errors.New("deploy: image: no binary")
	}
	platform, err := staticPlatform(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("deploy: image: %w", err)
	}
	if cfg.Version == "" {
		cfg.Version = BinaryVersion(cfg.Binary)
	}
	layerTar, err := imageLayer(cfg.Binary)
	if err != nil {
		return nil, fmt.Errorf("deploy: image: layer: %w", err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerTar)), nil },
		tarball.WithMediaType(types.DockerLayer))
	if err != nil {
		return nil, fmt.Errorf("deploy: image: layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, fmt.Errorf("deploy: image: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("deploy: image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = platform.OS, platform.Architecture
	cf.Created = v1.Time{Time: cfg.Created.UTC()}
	uid := strconv.Itoa(ImageUID)
	cf.Config = v1.Config{
		Entrypoint: []string{ImageBinaryPath},
		User:       uid + ":" + uid,
		WorkingDir: "/",
		Env:        []string{"PATH=/"},
		Labels: map[string]string{
			ImageLabelTitle:   "isthmus",
			ImageLabelVersion: cfg.Version,
			ImageLabelSource:  ImageSource,
		},
	}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("deploy: image: %w", err)
	}
	return &Image{Image: img, Version: cfg.Version, Platform: platform}, nil
}

// DefaultImageTag is the tag an image of version gets when none is given.
func DefaultImageTag(version string) string {
	return "isthmus:" + sanitizeTag(version)
}

var tagUnsafe = regexp.MustCompile(`[^A-Za-z0-9_.-]`)

// sanitizeTag makes a version usable as a tag (at most 128 characters of [A-Za-z0-9_.-],
// not starting with . or -).
func sanitizeTag(v string) string {
	t := tagUnsafe.ReplaceAllString(v, "-")
	if t == "" || t[0] == '.' || t[0] == '-' {
		t = "v" + t
	}
	if len(t) > 128 {
		t = t[:128]
	}
	return t
}

// WriteImageTarball writes img as a tarball that docker load, kind load image-archive and
// go-containerregistry read, under tag (e.g. isthmus:v0.3.0).
func WriteImageTarball(w io.Writer, img v1.Image, tag string) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return fmt.Errorf("deploy: image: tag %q: %w", tag, err)
	}
	if err := tarball.Write(ref, img, w); err != nil {
		return fmt.Errorf("deploy: image: write tarball: %w", err)
	}
	return nil
}

// staticPlatform checks that bin is a statically linked ELF executable and returns its
// platform. A binary with a program interpreter needs a C library the image lacks.
func staticPlatform(bin []byte) (v1.Platform, error) {
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return v1.Platform{}, fmt.Errorf("the binary is not an ELF executable: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return v1.Platform{}, errors.New("the binary is dynamically linked (it has a program interpreter); build it with CGO_ENABLED=0")
		}
	}
	arch := map[elf.Machine]string{elf.EM_X86_64: "amd64", elf.EM_AARCH64: "arm64", elf.EM_386: "386", elf.EM_ARM: "arm",
		elf.EM_PPC64: "ppc64le", elf.EM_S390: "s390x", elf.EM_RISCV: "riscv64"}[f.Machine]
	if arch == "" {
		return v1.Platform{}, fmt.Errorf("the binary is for machine %s, which has no image platform here", f.Machine)
	}
	return v1.Platform{OS: "linux", Architecture: arch}, nil
}

var versionFlag = regexp.MustCompile(`-X[= ]'?main\.version=([^' ]+)`)

// BinaryVersion returns the version linked into a Go binary with -X main.version=..., or
// "dev" when it has none (a plain go build).
func BinaryVersion(bin []byte) string {
	bi, err := buildinfo.Read(bytes.NewReader(bin))
	if err != nil {
		return "dev"
	}
	for _, s := range bi.Settings {
		if s.Key == "-ldflags" {
			if m := versionFlag.FindStringSubmatch(s.Value); m != nil {
				return m[1]
			}
		}
	}
	return "dev"
}

// imageLayer is the image's one layer, uncompressed: directories, the binary, the user
// database. Times are the epoch and owners root, so the layer is reproducible.
func imageLayer(bin []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	dir := func(name string, mode int64) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: epoch, Format: tar.FormatPAX})
	}
	file := func(name string, mode int64, data []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	uid := strconv.Itoa(ImageUID)
	steps := []func() error{
		func() error { return dir("etc/", 0o755) },
		func() error {
			return file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/sbin/nologin\nisthmus:x:"+uid+":"+uid+":isthmus:/tmp:/sbin/nologin\n"))
		},
		func() error { return file("etc/group", 0o644, []byte("root:x:0:\nisthmus:x:"+uid+":\n")) },
		func() error { return dir("tmp/", 0o1777) },
		func() error { return file(ImageBinaryPath[1:], 0o755, bin) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
