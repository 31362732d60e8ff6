package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/deploy"
)

// newImageCommand groups the image commands.
func newImageCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Build the isthmus container image without a daemon or a registry",
	}
	cmd.AddCommand(newImageBuildCommand())
	return cmd
}

// newImageBuildCommand builds the image from this (or another) static isthmus binary and
// writes it as a tarball, or pushes it.
func newImageBuildCommand() *cobra.Command {
	var binary, out, tag, push string
	cmd := &cobra.Command{
		Use:   "build",
		Short: "Build the isthmus image as a tarball (-o) or push it to a registry (--push)",
		Long: `Build the isthmus image: the static isthmus binary (this one, or --binary) on an empty
base with a non-root user, entrypoint /isthmus, labelled with the binary's version.

-o FILE writes a tarball that 'docker load' and 'kind load image-archive' read, tagged
--tag (default isthmus:<version>). --push REF sends the image to a registry with the
credentials of ~/.docker/config.json. No Docker daemon is needed for either.

The binary must be statically linked: build it with CGO_ENABLED=0.`,
		Example: `  CGO_ENABLED=0 go build -ldflags "-X main.version=v0.1.0" -o /tmp/isthmus ./cmd/isthmus
  /tmp/isthmus image build -o isthmus.tar
  kind load image-archive isthmus.tar`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" && push == "" {
				return errors.New("say where the image goes: -o FILE (a tarball) and/or --push REF (a registry)")
			}
			cfg := deploy.ImageConfig{}
			path := binary
			if path == "" {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("find this binary (give --binary): %w", err)
				}
				path, cfg.Version = exe, version
			}
			bin, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("--binary: %w", err)
			}
			cfg.Binary = bin
			img, err := deploy.BuildImage(cfg)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if tag == "" {
				tag = deploy.DefaultImageTag(img.Version)
			}
			if out != "" {
				if err := writeImageFile(out, img, tag); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: image %s (%s/%s, version %s)\n", out, tag, img.Platform.OS, img.Platform.Architecture, img.Version)
			}
			if push != "" {
				ref, err := name.ParseReference(push)
				if err != nil {
					return fmt.Errorf("--push %q: %w", push, err)
				}
				if err := remote.Write(ref, img, remote.WithContext(cmd.Context()), remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
					return fmt.Errorf("--push %s: %w", ref, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "pushed %s\n", ref)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&binary, "binary", "", "the static isthmus binary to package (default: this one)")
	f.StringVarP(&out, "output", "o", "", "tarball to write")
	f.StringVar(&tag, "tag", "", "tag in the tarball (default isthmus:<version>)")
	f.StringVar(&push, "push", "", "also push the image to this registry reference")
	return cmd
}

// writeImageFile writes the tarball through a temporary file renamed into place, so a
// failure leaves no partial tarball for kind or docker to load.
func writeImageFile(out string, img *deploy.Image, tag string) error {
	tmp, err := os.CreateTemp(filepath.Dir(out), ".isthmus-image-*")
	if err != nil {
		return fmt.Errorf("-o: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := deploy.WriteImageTarball(tmp, img, tag); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("-o: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("-o: %w", err)
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("-o: %w", err)
	}
	return nil
}
