package kubelocal

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/proc"
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

// Cluster is a running local cluster: etcd, kube-apiserver, kube-controller-manager and a
// node agent.
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

	cfg        Config
	rest       *rest.Config
	apiArgs    []string // the API server's flags, for RestartAPIServer
	etcdPorts  [2]int
	agentStop  context.CancelFunc
	agentDone  chan error
	stopOnce   sync.Once
	stopDetach bool

	mu sync.Mutex
	// procs are the running children, in start order; guarded by mu.
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

// maxPortAttempts bounds retries when a chosen port is taken before a component binds it.
const maxPortAttempts = 4

func (c *Cluster) startEtcd(ctx context.Context) error {
	host := c.cfg.BindAddress.String()
	for attempt := 1; ; attempt++ {
		client, err := c.cfg.pickPort(host)
		if err != nil {
			return err
		}
		peer, err := c.cfg.pickPort(host)
		if err != nil {
			return err
		}
		clientURL := "http://" + net.JoinHostPort(host, strconv.Itoa(client))
		peerURL := "http://" + net.JoinHostPort(host, strconv.Itoa(peer))
		args := []string{
			"--name=" + c.cfg.Name,
			"--data-dir=" + filepath.Join(c.cfg.Dir, "etcd"),
			"--listen-client-urls=" + clientURL,
			"--advertise-client-urls=" + clientURL,
			"--listen-peer-urls=" + peerURL,
			"--initial-advertise-peer-urls=" + peerURL,
			"--initial-cluster=" + c.cfg.Name + "=" + peerURL,
			// A throwaway local cluster does not need durable writes; fsync dominates
			// etcd's latency on shared disks.
			"--unsafe-no-fsync=true",
			"--log-level=warn",
			"--quota-backend-bytes=" + strconv.Itoa(2<<30),
		}
		p, err := c.startProc("etcd", kubebin.Etcd, args)
		if err != nil {
			return err
		}
		err = waitReady(ctx, p, func(ctx context.Context) error {
			return httpGetOK(ctx, http.DefaultClient, clientURL+"/health")
		})
		if err == nil {
			c.etcdPorts = [2]int{client, peer}
			return nil
		}
		if retry := portConflict(p) && attempt < maxPortAttempts; retry {
			c.cfg.Log.Warn("etcd port taken before it could bind; retrying with new ports", "cluster", c.cfg.Name, "attempt", attempt)
			c.dropProc(p)
			os.RemoveAll(filepath.Join(c.cfg.Dir, "etcd"))
			continue
		}
		return err
	}
}

func (c *Cluster) startAPIServer(ctx context.Context, pki pkiFiles) error {
	host := c.cfg.BindAddress.String()
	etcdURL := "http://" + net.JoinHostPort(host, strconv.Itoa(c.etcdPorts[0]))
	tlsConfig, err := adminTLS(pki)
	if err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConfig}, Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	for attempt := 1; ; attempt++ {
		port, err := c.cfg.pickPort(host)
		if err != nil {
			return err
		}
		args := []string{
			"--etcd-servers=" + etcdURL,
			"--bind-address=" + host,
			"--advertise-address=" + host,
			"--secure-port=" + strconv.Itoa(port),
			"--cert-dir=" + filepath.Join(c.cfg.Dir, "pki"),
			"--tls-cert-file=" + pki.ServingCert,
			"--tls-private-key-file=" + pki.ServingKey,
			"--client-ca-file=" + pki.CACert,
			"--service-account-issuer=https://kubernetes.default.svc." + c.cfg.Domain,
			"--service-account-key-file=" + pki.SAPublic,
			"--service-account-signing-key-file=" + pki.SAPrivate,
			"--service-cluster-ip-range=" + c.cfg.ServiceCIDR.String(),
			"--authorization-mode=RBAC",
			"--allow-privileged=true",
			// There is no kube-proxy or real node network behind the kubernetes Service,
			// and the loopback address cannot be advertised as its endpoint.
			"--endpoint-reconciler-type=none",
			"--enable-priority-and-fairness=false",
			"--profiling=false",
			"--v=1",
		}
		args = append(args, c.cfg.ExtraAPIServerArgs...)
		p, err := c.startProc("kube-apiserver", kubebin.APIServer, args)
		if err != nil {
			return err
		}
		url := "https://" + net.JoinHostPort(host, strconv.Itoa(port))
		err = waitReady(ctx, p, func(ctx context.Context) error {
			if err := c.checkAlive(); err != nil {
				return backoffStop{err}
			}
			return httpGetOK(ctx, client, url+"/readyz")
		})
		if err == nil {
			c.URL = url
			c.apiArgs = args
			return nil
		}
		if retry := portConflict(p) && attempt < maxPortAttempts; retry {
			c.cfg.Log.Warn("kube-apiserver port taken before it could bind; retrying with a new port", "cluster", c.cfg.Name, "attempt", attempt)
			c.dropProc(p)
			continue
		}
		return err
	}
}

func (c *Cluster) writeKubeconfigs(pki pkiFiles) error {
	ca, err := os.ReadFile(pki.CACert)
	if err != nil {
		return err
	}
	write := func(path, user, certPath, keyPath string) (*rest.Config, error) {
		cert, err := os.ReadFile(certPath)
		if err != nil {
			return nil, err
		}
		key, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, err
		}
		kc := clientcmdapi.NewConfig()
		kc.Clusters[c.Name] = &clientcmdapi.Cluster{Server: c.URL, CertificateAuthorityData: ca}
		kc.AuthInfos[user] = &clientcmdapi.AuthInfo{ClientCertificateData: cert, ClientKeyData: key}
		kc.Contexts[c.Name] = &clientcmdapi.Context{Cluster: c.Name, AuthInfo: user}
		kc.CurrentContext = c.Name
		if err := clientcmd.WriteToFile(*kc, path); err != nil {
			return nil, fmt.Errorf("write kubeconfig: %w", err)
		}
		return clientcmd.NewDefaultClientConfig(*kc, nil).ClientConfig()
	}
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	rc, err := write(c.Kubeconfig, c.Name+"-admin", pki.AdminCert, pki.AdminKey)
	if err != nil {
		return err
	}
	// client-go's default client-side limit (5 requests/s) would dominate tests and
	// benchmarks against a private local API server.
	rc.QPS, rc.Burst = 500, 1000
	c.rest = rc
	_, err = write(filepath.Join(c.Dir, "controller-manager.kubeconfig"), "controller-manager", pki.ControllerCert, pki.ControllerKey)
	return err
}

// controllers are the kube-controller-manager controllers a local cluster runs: enough for
// EndpointSlices, service accounts, namespaces, garbage collection and Deployments, and
// nothing that needs a cloud, kubelets or volumes.
var controllers = []string{
	"serviceaccount-controller",
	"endpoints-controller",
	"endpointslice-controller",
	"endpointslice-mirroring-controller",
	"namespace-controller",
	"garbage-collector-controller",
	"root-ca-certificate-publisher-controller",
	"deployment-controller",
	"replicaset-controller",
}

func (c *Cluster) startControllerManager(pki pkiFiles) error {
	kc := filepath.Join(c.Dir, "controller-manager.kubeconfig")
	args := []string{
		"--kubeconfig=" + kc,
		"--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc,
		"--bind-address=" + c.cfg.BindAddress.String(),
		"--secure-port=0",
		"--leader-elect=false",
		"--controllers=" + strings.Join(controllers, ","),
		"--root-ca-file=" + pki.CACert,
		"--service-cluster-ip-range=" + c.cfg.ServiceCIDR.String(),
		"--use-service-account-credentials=false",
		"--concurrent-endpoint-syncs=10",
		"--concurrent-service-endpoint-syncs=10",
		"--v=1",
	}
	_, err := c.startProc("kube-controller-manager", kubebin.ControllerManager, args)
	return err
}

func (c *Cluster) startAgent() error {
	if len(c.cfg.AgentCommand) > 0 {
		args := append([]string(nil), c.cfg.AgentCommand[1:]...)
		args = append(args, "--kubeconfig", c.Kubeconfig, "--node", c.NodeName, "--pod-cidr", c.cfg.PodCIDR.String())
		if c.cfg.Region != "" {
			args = append(args, "--region", c.cfg.Region)
		}
		if c.cfg.Zone != "" {
			args = append(args, "--zone", c.cfg.Zone)
		}
		_, err := c.startProcPath("node-agent", c.cfg.AgentCommand[0], args)
		return err
	}
	if c.cfg.Detached {
		return nil
	}
	client, err := c.Client()
	if err != nil {
		return err
	}
	agent, err := NewNodeAgent(NodeAgentConfig{
		Client:   client,
		NodeName: c.NodeName,
		PodCIDR:  c.cfg.PodCIDR,
		Region:   c.cfg.Region,
		Zone:     c.cfg.Zone,
		Log:      c.cfg.Log.With("cluster", c.Name),
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	c.agentStop = cancel
	c.agentDone = make(chan error, 1)
	go func() { c.agentDone <- agent.Run(ctx) }()
	return nil
}

// waitDefaultServiceAccount waits until the controller manager has made the default
// service account, which the API server requires before it admits Pods.
func (c *Cluster) waitDefaultServiceAccount(ctx context.Context) error {
	client, err := c.Client()
	if err != nil {
		return err
	}
	err = poll(ctx, 50*time.Millisecond, func(ctx context.Context) error {
		if err := c.checkAlive(); err != nil {
			return backoffStop{err}
		}
		_, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return errors.New("the default service account does not exist yet (kube-controller-manager not working?)")
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("wait for kube-controller-manager: %w", err)
	}
	return nil
}

func (c *Cluster) startProc(name, bin string, args []string) (*proc.Process, error) {
	return c.startProcPath(name, c.cfg.Binaries.Path(bin), args)
}

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

// dropProc stops p and forgets it (after a failed attempt that will be retried).
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

// checkAlive returns the exit report of the first component that has stopped.
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
// is ready.
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
// a grace period before SIGKILL. Stop is idempotent; the cluster's directory is kept.
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

// StartMany starts clusters concurrently and returns them in the order of configs. If any
// fails, the others are stopped and the error lists every failure.
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

func adminTLS(pki pkiFiles) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(pki.AdminCert, pki.AdminKey)
	if err != nil {
		return nil, err
	}
	caPEM, err := os.ReadFile(pki.CACert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// freePort asks the kernel for an unused TCP port on host. Another process may take it
// before the component binds it; callers detect that and retry (portConflict).
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// portConflict reports whether p died because its port was taken.
func portConflict(p *proc.Process) bool {
	select {
	case <-p.Done():
	case <-time.After(2 * time.Second):
		return false
	}
	return strings.Contains(proc.LogTail(p.LogPath, 50), "address already in use")
}
