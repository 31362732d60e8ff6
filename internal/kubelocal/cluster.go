package kubelocal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/proc"
)

// Cluster is a running local cluster: etcd, kube-apiserver, kube-controller-manager and a
// node agent.
//
// The exported fields and everything but procs are written only while Start runs and are
// read-only afterwards, so a Cluster returned by Start may be shared between goroutines;
// the methods that touch procs take mu.
type Cluster struct {
	// Name is the cluster's name from Config.
	Name string
	// Dir holds everything the cluster wrote.
	Dir string
	// URL is the API server's address, https://<bind>:<port>.
	URL string
	// Kubeconfig is the path of an admin kubeconfig with inline credentials.
	Kubeconfig string
	// NodeName is the name of the cluster's one Node.
	NodeName string

	cfg  Config // with defaults applied
	rest *rest.Config
	// apiArgs are the API server's flags, its port among them, so that RestartAPIServer
	// brings it back at the URL clients already hold.
	apiArgs []string
	// etcdPorts are etcd's client and peer ports, once etcd is ready.
	etcdPorts [2]int
	// agentStop and agentDone are set only when the node agent runs in this process:
	// Stop cancels it and waits for Run to return before stopping the API server.
	agentStop context.CancelFunc
	agentDone chan error
	stopOnce  sync.Once

	mu sync.Mutex
	// procs are the running children, in start order (Stop walks it backwards); guarded
	// by mu. A child that exited stays in it, so that Err can report it.
	procs []*proc.Process
}

// RESTConfig returns a copy of the admin client configuration.
func (c *Cluster) RESTConfig() *rest.Config { return rest.CopyConfig(c.rest) }

// Client returns a new admin clientset.
func (c *Cluster) Client() (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(c.RESTConfig())
}

// Err returns a description of the first component that has exited, with the tail of its
// log, or nil while all are running.
func (c *Cluster) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.procs {
		if p.Exited() {
			return fmt.Errorf("kubelocal: cluster %s: %w", c.Name, p.ExitError())
		}
	}
	return nil
}

// PIDs returns the process ID of each running component by name.
func (c *Cluster) PIDs() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]int, len(c.procs))
	for _, p := range c.procs {
		m[p.Name] = p.PID()
	}
	return m
}

// Start brings up one cluster and returns when its API server is ready and its controller
// manager has created the default service account (the point at which Pods can be
// created). On failure everything started is stopped and the error names the component
// that failed, with the tail of its log.
func Start(ctx context.Context, config Config) (*Cluster, error) {
	cfg, err := config.withDefaults()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	c := &Cluster{Name: cfg.Name, Dir: cfg.Dir, cfg: cfg, NodeName: cfg.Name + "-node"}
	if err := c.start(ctx); err != nil {
		c.Stop()
		if ctx.Err() != nil && !errors.Is(err, context.Canceled) {
			err = fmt.Errorf("%w (start timeout %s)", err, cfg.StartTimeout)
		}
		return nil, fmt.Errorf("kubelocal: start cluster %s: %w", cfg.Name, err)
	}
	return c, nil
}

// start brings the components up in dependency order: etcd, then the API server that
// stores in it, then the kubeconfigs (they need the API server's URL), then the controller
// manager and node agent that use them. The state file is written last, so that a
// cluster.json on disk always describes a cluster that became ready. On error, what was
// started stays in c.procs for the caller to stop.
func (c *Cluster) start(ctx context.Context) error {
	cfg := c.cfg
	start := time.Now()
	for _, d := range []string{"pki", "etcd", "logs"} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, d), 0o700); err != nil {
			return err
		}
	}
	serviceIP := cfg.ServiceCIDR.Addr().Next()
	pki, err := writePKI(filepath.Join(cfg.Dir, "pki"), pkiRequest{
		Name:      cfg.Name,
		ServingIP: []net.IP{net.IP(cfg.BindAddress.AsSlice())},
		ServiceIP: net.IP(serviceIP.AsSlice()),
		Domain:    cfg.Domain,
	})
	if err != nil {
		return fmt.Errorf("write PKI: %w", err)
	}
	if err := c.startEtcd(ctx); err != nil {
		return err
	}
	cfg.Log.Debug("etcd ready", "cluster", cfg.Name, "after", time.Since(start))
	if err := c.startAPIServer(ctx, pki); err != nil {
		return err
	}
	cfg.Log.Debug("kube-apiserver ready", "cluster", cfg.Name, "after", time.Since(start))
	if err := c.writeKubeconfigs(pki); err != nil {
		return err
	}
	if err := c.startControllerManager(pki); err != nil {
		return err
	}
	if err := c.startAgent(); err != nil {
		return err
	}
	if err := c.waitDefaultServiceAccount(ctx); err != nil {
		return err
	}
	if err := c.writeState(); err != nil {
		return err
	}
	cfg.Log.Info("cluster ready", "cluster", cfg.Name, "url", c.URL, "after", time.Since(start).Round(time.Millisecond))
	return nil
}

// startProc starts the kubebin binary bin as component name; see startProcPath.
func (c *Cluster) startProc(name, bin string, args []string) (*proc.Process, error) {
	return c.startProcPath(name, c.cfg.Binaries.Path(bin), args)
}

// startProcPath starts path as component name, logging to <Dir>/logs/<name>.log, and
// records it in c.procs. A detached cluster's children get their own session and no
// parent-death signal (Config.Detached); all others die with this process.
func (c *Cluster) startProcPath(name, path string, args []string) (*proc.Process, error) {
	p, err := proc.Start(name, path, args, filepath.Join(c.Dir, "logs", name+".log"), c.cfg.Detached, nil)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p, nil
}

// dropProc stops p and forgets it: after a failed attempt that will be retried, or for
// StopAPIServer. Forgetting matters: Err and checkAlive would otherwise report the stopped
// process as a failed component. The short grace is enough for a process that never became
// ready or that clients are meant to see vanish.
func (c *Cluster) dropProc(p *proc.Process) {
	p.Stop(2 * time.Second)
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, q := range c.procs {
		if q == p {
			c.procs = append(c.procs[:i], c.procs[i+1:]...)
			return
		}
	}
}

// checkAlive returns the exit report of the first component that has stopped, without the
// cluster's name (the callers' errors carry it). Readiness polls call it so that a component
// that dies while another is starting fails Start at once, not at the timeout.
func (c *Cluster) checkAlive() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.procs {
		if p.Exited() {
			return p.ExitError()
		}
	}
	return nil
}

// StopAPIServer stops only the API server, as an outage of a cluster's control plane
// looks to its clients; etcd, the controller manager and the node agent keep running and
// retry. RestartAPIServer brings it back on the same address.
func (c *Cluster) StopAPIServer() {
	c.mu.Lock()
	var api *proc.Process
	for _, p := range c.procs {
		if p.Name == "kube-apiserver" {
			api = p
		}
	}
	c.mu.Unlock()
	if api != nil {
		c.dropProc(api)
	}
}

// RestartAPIServer starts the API server again with the flags it had, and waits until it
// is ready (bounded by Config.StartTimeout). It reuses the old port on purpose: clients and
// kubeconfigs hold the URL. If another process took the port meanwhile, the restart fails
// with the API server's log tail; it is not retried on a new port. It refuses while the
// API server is running.
func (c *Cluster) RestartAPIServer(ctx context.Context) error {
	if _, running := c.PIDs()["kube-apiserver"]; running {
		return fmt.Errorf("kubelocal: cluster %s: the API server is running", c.Name)
	}
	pki := newPKIFiles(filepath.Join(c.Dir, "pki"))
	tlsConfig, err := adminTLS(pki)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConfig}, Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	p, err := c.startProc("kube-apiserver", kubebin.APIServer, c.apiArgs)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.cfg.StartTimeout)
	defer cancel()
	if err := waitReady(ctx, p, func(ctx context.Context) error { return httpGetOK(ctx, client, c.URL+"/readyz") }); err != nil {
		return fmt.Errorf("kubelocal: cluster %s: restart API server: %w", c.Name, err)
	}
	return nil
}

// Stop stops the cluster's processes: the node agent and controller manager first, then
// the API server, then etcd (an API server whose etcd is gone hangs in shutdown). Each gets
// a grace period before SIGKILL. Stop is idempotent and safe to call from several
// goroutines; the cluster's directory is kept. An in-process node agent is stopped and
// waited for first, so that it never logs errors against a stopped API server.
func (c *Cluster) Stop() {
	c.stopOnce.Do(func() {
		if c.agentStop != nil {
			c.agentStop()
			<-c.agentDone
		}
		c.mu.Lock()
		procs := append([]*proc.Process(nil), c.procs...)
		c.mu.Unlock()
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].Stop(5 * time.Second)
		}
	})
}

// StartMany starts clusters concurrently and returns them in the order of configs. Each
// start has its own Config.StartTimeout. If any fails, the others are stopped (all or
// nothing) and the error lists every failure.
func StartMany(ctx context.Context, configs []Config) ([]*Cluster, error) {
	clusters := make([]*Cluster, len(configs))
	errs := make([]error, len(configs))
	var wg sync.WaitGroup
	for i := range configs {
		wg.Go(func() { clusters[i], errs[i] = Start(ctx, configs[i]) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, c := range clusters {
			if c != nil {
				c.Stop()
			}
		}
		return nil, err
	}
	return clusters, nil
}
