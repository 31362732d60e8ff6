package kubelocal

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
)

// Config describes one local cluster. Zero values of optional fields are documented
// defaults.
type Config struct {
	// Name identifies the cluster (kubeconfig context, node name prefix); required.
	Name string
	// Dir is where the cluster keeps its PKI, etcd data, logs, kubeconfig and state file;
	// required. Stop leaves it in place.
	Dir string
	// Binaries are the etcd and Kubernetes binaries to run; required.
	Binaries *kubebin.Set
	// BindAddress is the address etcd and the API server listen on; default 127.0.0.1.
	BindAddress netip.Addr
	// ServiceCIDR is the Service ClusterIP range; default 10.96.0.0/16.
	ServiceCIDR netip.Prefix
	// PodCIDR is the range the node agent assigns pod IPs from when a Pod does not ask for
	// one (annotation PodIPAnnotation); default 10.244.0.0/16.
	PodCIDR netip.Prefix
	// Domain is the cluster DNS domain; default cluster.local.
	Domain string
	// Region and Zone label the cluster's node (topology.kubernetes.io/region|zone), from
	// which endpoints get their locality. Both may be empty.
	Region, Zone string
	// Detached makes the processes outlive this program (new session, no parent-death
	// signal); they are then stopped with StopDetached. The in-process node agent is not run
	// for a detached cluster: set AgentCommand to run it as a detached process.
	Detached bool
	// AgentCommand, when set, runs the node agent as a child process: the command plus
	// "--kubeconfig <path> --node <name> --pod-cidr <cidr>" (and --region/--zone). When
	// empty and the cluster is not detached, the agent runs in this process.
	AgentCommand []string
	// StartTimeout bounds Start; default 90 s, generous for a loaded 2-core machine.
	StartTimeout time.Duration
	// ExtraAPIServerArgs are appended to kube-apiserver's flags.
	ExtraAPIServerArgs []string
	// Log receives progress and component events; nil discards them.
	Log *slog.Logger

	// pickPort, when set, replaces the free-port picker (tests use it to hand out a port
	// that is already taken).
	pickPort func(host string) (int, error)
}

// withDefaults returns a copy of c with every default applied, or the first problem with
// it. It checks that the binaries exist before anything is written, so that a bad Config
// leaves no directory behind.
func (c *Config) withDefaults() (Config, error) {
	cfg := *c
	if cfg.Name == "" {
		return cfg, errors.New("kubelocal: config: Name is required")
	}
	if cfg.Dir == "" {
		return cfg, fmt.Errorf("kubelocal: cluster %s: Dir is required", cfg.Name)
	}
	if cfg.Binaries == nil {
		return cfg, fmt.Errorf("kubelocal: cluster %s: Binaries are required (see kubebin.Ensure)", cfg.Name)
	}
	for _, name := range kubebin.All {
		if p := cfg.Binaries.Path(name); p == "" {
			if name == kubebin.Kubectl {
				continue // not needed to run a cluster
			}
			return cfg, fmt.Errorf("kubelocal: cluster %s: no %s binary", cfg.Name, name)
		} else if _, err := os.Stat(p); err != nil {
			return cfg, fmt.Errorf("kubelocal: cluster %s: %s binary: %w", cfg.Name, name, err)
		}
	}
	if !cfg.BindAddress.IsValid() {
		cfg.BindAddress = netip.MustParseAddr("127.0.0.1")
	}
	if !cfg.ServiceCIDR.IsValid() {
		cfg.ServiceCIDR = netip.MustParsePrefix("10.96.0.0/16")
	}
	if !cfg.PodCIDR.IsValid() {
		cfg.PodCIDR = netip.MustParsePrefix("10.244.0.0/16")
	}
	if cfg.Domain == "" {
		cfg.Domain = "cluster.local"
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 90 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if cfg.pickPort == nil {
		cfg.pickPort = freePort
	}
	return cfg, nil
}
