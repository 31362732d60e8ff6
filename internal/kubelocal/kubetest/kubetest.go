package kubetest

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
)

// One lookup (or build) per test binary: every test of a package shares its result, a
// failure included, so that a missing toolchain fails each test with the same message
// instead of attempting the build again.
var (
	binOnce sync.Once
	binSet  *kubebin.Set
	binErr  error
)

// Binaries returns the cluster binaries, building them on first use (progress goes to
// stderr; the build is bounded by 30 minutes). It honours KUBEBUILDER_ASSETS and
// ISTHMUS_K8S_CACHE. It does not skip when the binaries are missing: it builds them, or
// waits for the process that is building them (kubebin.Ensure holds a file lock).
func Binaries() (*kubebin.Set, error) {
	binOnce.Do(func() {
		o := kubebin.OptionsFromEnv()
		o.Progress = os.Stderr
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
		defer cancel()
		binSet, binErr = kubebin.Ensure(ctx, o)
	})
	return binSet, binErr
}

// Configs returns n cluster configurations named <prefix>-1..n under dir, each with its
// own pod CIDR (10.<10+i>.0.0/16, so that pods of different clusters never share an IP),
// region and zone (region-<i>, zone-<i>a, for locality tests). The service CIDR is the
// default for all; ClusterIPs are never compared across clusters.
func Configs(set *kubebin.Set, dir, prefix string, n int) []kubelocal.Config {
	cfgs := make([]kubelocal.Config, n)
	for i := range cfgs {
		name := prefix + "-" + strconv.Itoa(i+1)
		cfgs[i] = kubelocal.Config{
			Name:     name,
			Dir:      filepath.Join(dir, name),
			Binaries: set,
			Region:   "region-" + strconv.Itoa(i+1),
			Zone:     "zone-" + strconv.Itoa(i+1) + "a",
		}
		cfgs[i].PodCIDR = mustPrefix(fmt.Sprintf("10.%d.0.0/16", 10+i))
	}
	return cfgs
}

// Start starts n clusters for t and stops them when t ends. It skips under -short and
// fails t when the binaries cannot be had or a cluster does not start.
func Start(t testing.TB, n int) []*kubelocal.Cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: starts real Kubernetes clusters; runs without -short")
	}
	set, err := Binaries()
	if err != nil {
		t.Fatal(err)
	}
	clusters, err := kubelocal.StartMany(context.Background(), Configs(set, t.TempDir(), "c", n))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range clusters {
			c.Stop()
		}
	})
	return clusters
}

// StartShared starts n clusters for a whole test binary, from TestMain. It returns
// (nil, nil-op, nil) under -short, so the caller's tests skip themselves; the returned stop
// function stops the clusters and removes their directory.
func StartShared(n int, prefix string) ([]*kubelocal.Cluster, func(), error) {
	if !flag.Parsed() {
		flag.Parse()
	}
	if testing.Short() || fuzzing() {
		return nil, func() {}, nil
	}
	set, err := Binaries()
	if err != nil {
		return nil, func() {}, err
	}
	dir, err := os.MkdirTemp("", "isthmus-"+prefix+"-")
	if err != nil {
		return nil, func() {}, err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cfgs := Configs(set, dir, prefix, n)
	for i := range cfgs {
		cfgs[i].Log = log
	}
	clusters, err := kubelocal.StartMany(context.Background(), cfgs)
	if err != nil {
		os.RemoveAll(dir)
		return nil, func() {}, err
	}
	return clusters, func() {
		for _, c := range clusters {
			c.Stop()
		}
		os.RemoveAll(dir)
	}, nil
}

func mustPrefix(s string) netip.Prefix {
	return netip.MustParsePrefix(s)
}

// Main runs a test binary whose tests share n clusters, from TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(kubetest.Main(m, 3, "pr", setup)) }
//
// It starts the clusters (none under -short), calls setup with them (if setup is not nil
// and clusters were started), runs the tests, then undoes setup and stops the clusters. A
// failure to start or set up is printed and makes the binary fail without running tests.
func Main(m *testing.M, n int, prefix string, setup func([]*kubelocal.Cluster) (cleanup func(), err error)) int {
	clusters, stop, err := StartShared(n, prefix)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubetest: start shared clusters:", err)
		return 1
	}
	defer stop()
	if clusters != nil && setup != nil {
		cleanup, err := setup(clusters)
		if err != nil {
			fmt.Fprintln(os.Stderr, "kubetest: set up shared environment:", err)
			return 1
		}
		defer cleanup()
	}
	return m.Run()
}

// fuzzing reports whether this test binary runs a fuzz target (as the coordinator or one
// of its workers): fuzz targets are pure, and starting clusters in every worker would
// only slow fuzzing to a crawl.
func fuzzing() bool {
	if f := flag.Lookup("test.fuzz"); f != nil && f.Value.String() != "" {
		return true
	}
	f := flag.Lookup("test.fuzzworker")
	return f != nil && f.Value.String() == "true"
}

// Eventually calls check every 50 ms until it returns nil, failing t with check's last
// error when timeout passes first. Tests wait for conditions this way, never by sleeping.
func Eventually(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
