package nodeimage

import (
	"archive/tar"
	"bufio"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// writeDirTar writes the tree under root to w as a layer: directories, regular files
// (hard links kept as links), symlinks, with their modes and owners. Device nodes, sockets
// and fifos are left out (the runtime makes /dev); so are the paths skip returns true for.
func writeDirTar(w io.Writer, root string, skip func(rel string) bool) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	tw := tar.NewWriter(bw)
	links := map[[2]uint64]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		if skip != nil && skip(rel) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		info, err := os.Lstat(path)
		if err != nil {
			return err
		}
		mode := info.Mode()
		if mode&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeSocket|fs.ModeNamedPipe) != 0 {
			return nil
		}
		target := ""
		if mode&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(path); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(info, target)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if info.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX
		hdr.ModTime = hdr.ModTime.Truncate(time.Second)
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		if st, ok := info.Sys().(*syscall.Stat_t); ok && mode.IsRegular() && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, seen := links[key]; seen {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[key] = hdr.Name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, f)
			f.Close()
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return bw.Flush()
}

// entry is one item of a layer built from a list: a file (Data or Source), a directory, a
// symlink, or a whiteout that deletes Name from the layers below.
type entry struct {
	Name     string // path without a leading slash
	Mode     int64
	Data     []byte // file contents, or
	Source   string // a file to copy
	Dir      bool
	Link     string // symlink target
	Whiteout bool
}

// writeEntries writes es as a layer, with the parent directories each needs.
func writeEntries(w io.Writer, es []entry) error {
	tw := tar.NewWriter(w)
	made := map[string]bool{}
	epoch := time.Unix(0, 0)
	var parents func(name string) error
	parents = func(name string) error {
		d := filepath.Dir(name)
		if d == "." || made[d] {
			return nil
		}
		if err := parents(d); err != nil {
			return err
		}
		made[d] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
	}
	for _, e := range es {
		name := strings.TrimPrefix(e.Name, "/")
		if err := parents(name); err != nil {
			return err
		}
		hdr := &tar.Header{Name: name, Mode: e.Mode, ModTime: epoch, Format: tar.FormatPAX}
		var body io.Reader
		switch {
		case e.Whiteout:
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeReg, filepath.Join(filepath.Dir(name), ".wh."+filepath.Base(name)), 0o644
		case e.Dir:
			hdr.Typeflag, hdr.Name = tar.TypeDir, name+"/"
			made[name] = true
		case e.Link != "":
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, e.Link
		case e.Source != "":
			f, err := os.Open(e.Source)
			if err != nil {
				return err
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Size, body = tar.TypeReg, st.Size(), f
		default:
			hdr.Typeflag, hdr.Size, body = tar.TypeReg, int64(len(e.Data)), strings.NewReader(string(e.Data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if body != nil {
			if _, err := io.Copy(tw, body); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
	}
	return tw.Close()
}
