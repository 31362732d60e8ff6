package kubelocal

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/proc"
)

// maxPortAttempts bounds retries when a chosen port is taken before a component binds it.
// Each attempt picks fresh ports, so losing four races in a row means something on the
// machine is grabbing ports as fast as they are freed; then the error is reported.
const maxPortAttempts = 4

// startEtcd starts a single-member etcd on two free ports and waits for /health. It sets
// c.etcdPorts only once etcd is healthy.
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
			// The failed member may have written its data directory with the old peer URL;
			// a member started on new ports must not find it.
			os.RemoveAll(filepath.Join(c.cfg.Dir, "etcd"))
			continue
		}
		return err
	}
}

// startAPIServer starts kube-apiserver on a free port against etcd and waits for /readyz,
// probed with the admin client certificate and verified against the cluster's CA (so a
// foreign server that took the port is never mistaken for ours). It sets c.URL and
// c.apiArgs only once the server is ready.
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
			// etcd dying while the API server starts would otherwise show only as a
			// never-ready API server at the timeout.
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

// writeKubeconfigs writes <Dir>/kubeconfig for the admin (system:masters) and
// <Dir>/controller-manager.kubeconfig for the controller manager, each with its
// credentials and the CA inline so that the files can be copied anywhere, and sets
// c.Kubeconfig and c.rest. It needs c.URL, so it runs after the API server is ready.
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
// nothing that needs a cloud, kubelets or volumes. The service-account token controller
// fills legacy token Secrets (type kubernetes.io/service-account-token) with ca.crt and a
// token, as every real cluster does; tools such as istioctl create-remote-secret read them.
var controllers = []string{
	"serviceaccount-controller",
	"serviceaccount-token-controller",
	"endpoints-controller",
	"endpointslice-controller",
	"endpointslice-mirroring-controller",
	"namespace-controller",
	"garbage-collector-controller",
	"root-ca-certificate-publisher-controller",
	"deployment-controller",
	"replicaset-controller",
}

// startControllerManager starts kube-controller-manager and returns without waiting: it
// serves no port (--secure-port=0, so there is no port to race for and nothing to probe),
// and Start judges it working by the default service account it creates
// (waitDefaultServiceAccount). Leader election is off because it is the only instance;
// the controllers run under its own certificate (system:masters, see pki.go) rather than
// one service account each (--use-service-account-credentials=false).
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
		"--service-account-private-key-file=" + pki.SAPrivate, // signs legacy token Secrets
		"--service-cluster-ip-range=" + c.cfg.ServiceCIDR.String(),
		"--use-service-account-credentials=false",
		"--concurrent-endpoint-syncs=10",
		"--concurrent-service-endpoint-syncs=10",
		"--v=1",
	}
	_, err := c.startProc("kube-controller-manager", kubebin.ControllerManager, args)
	return err
}

// startAgent runs the node agent in one of three ways: as Config.AgentCommand, a child
// process like the other components (the CLI's detached clusters use this, so the agent
// outlives the command); not at all for a detached cluster without a command (nothing
// in this process would outlive it); otherwise in this process, stopped by Stop.
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

// adminTLS is a client configuration with the admin certificate that trusts only the
// cluster's own CA, for probing the API server before a kubeconfig exists.
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

// portConflict reports whether p died because its port was taken. A process that failed
// readiness for another reason may still be running (a start timeout), so it waits up to
// 2 s for p to exit and then reads the tail of its log; a process still running is no
// conflict.
func portConflict(p *proc.Process) bool {
	select {
	case <-p.Done():
	case <-time.After(2 * time.Second):
		return false
	}
	return strings.Contains(proc.LogTail(p.LogPath, 50), "address already in use")
}
