package scenarios

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// ErrNeedsNamespaces is returned by the local provider for a multi-network topology when
// it cannot separate networks (not root, or namespaces turned off).
var ErrNeedsNamespaces = errors.New("scenarios: a topology with several networks needs network namespaces, which need root; run as root, or pick a single-network scenario")

// Local is the local provider: internal/kubelocal clusters, a network namespace per
// network (as root), and every component as a process of the isthmus binary.
type Local struct {
	// Binary is the isthmus executable that runs primaries, gateways and workloads;
	// required.
	Binary string
	// Kube are the etcd and Kubernetes binaries; required.
	Kube *kubebin.Set
	// NoNamespaces runs every pod on the host's own address (a port each) even as root. Only
	// single-network topologies run that way.
	NoNamespaces bool
	// Log receives the clusters' events; nil discards.
	Log *slog.Logger
}

// Name implements Provider.
func (l *Local) Name() string { return "local" }

// Start implements Provider.
func (l *Local) Start(ctx context.Context, t *Topology, dir string, progress func(string)) (Environment, error) {
	if l.Binary == "" || l.Kube == nil {
		return nil, errors.New("scenarios: local provider: Binary and Kube are required")
	}
	useNS := !l.NoNamespaces && os.Geteuid() == 0
	if (t.MultiNetwork() || t.Ingress != nil) && !useNS {
		return nil, ErrNeedsNamespaces
	}
	e := &localEnv{p: l, t: t, dir: dir, nets: map[string]*localNet{}, podAddrs: map[netip.Addr]bool{}}
	if useNS {
		progress(fmt.Sprintf("creating %d network(s) as network namespaces, forwarding off", len(t.Networks)))
		if err := e.buildNetworks(); err != nil {
			e.Close()
			return nil, err
		}
	} else {
		progress("networks are not separated: every pod on this host's address, a port each")
	}

	progress(fmt.Sprintf("starting %d cluster(s): etcd, kube-apiserver, kube-controller-manager and a node agent each", len(t.Clusters)))
	cfgs := make([]kubelocal.Config, len(t.Clusters))
	for i, c := range t.Clusters {
		pod, _ := netip.ParsePrefix(c.PodCIDR)
		svc, _ := netip.ParsePrefix(c.ServiceCIDR)
		cfgs[i] = kubelocal.Config{Name: c.Name, Dir: filepath.Join(dir, "clusters", c.Name), Binaries: l.Kube,
			PodCIDR: pod, ServiceCIDR: svc, Region: c.Region, Zone: c.Zone, Log: l.Log}
	}
	start := time.Now()
	kcs, err := kubelocal.StartMany(ctx, cfgs)
	if err != nil {
		e.Close()
		return nil, err
	}
	e.kube = kcs
	for i, kc := range kcs {
		// The runner publishes gateways with spec.externalIPs, which the API server warns
		// about on every write; the warning says nothing to a scenario's user.
		rc := kc.RESTConfig()
		rc.WarningHandler = rest.NoWarnings{}
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			e.Close()
			return nil, err
		}
		e.clusters = append(e.clusters, &Cluster{Name: kc.Name, Network: mesh.NetworkID(t.Clusters[i].Network),
			Kubeconfig: kc.Kubeconfig, APIServer: kc.URL, REST: kc.RESTConfig(), Client: client})
	}
	progress(fmt.Sprintf("%d cluster(s) ready in %.1fs", len(kcs), time.Since(start).Seconds()))
	return e, nil
}

// localNet is one network's namespaces: its pods' namespace and, if it has one, its
// gateway's namespace with the gateway's public address.
type localNet struct {
	pods    *netlab.Namespace
	gateway *netlab.Namespace
	public  netip.Addr
}

type localEnv struct {
	p        *Local
	t        *Topology
	dir      string
	kube     []*kubelocal.Cluster
	clusters []*Cluster

	mu sync.Mutex
	// nets, podAddrs and comps are guarded by mu.
	nets     map[string]*localNet
	podAddrs map[netip.Addr]bool
	comps    []*Component
	closed   bool
	// args are each component's arguments, for restarts; routes the namespaces' routes
	// saved by the first partition, for heals (local_fault.go). Guarded by mu.
	args   map[*Component][]string
	routes map[string][]nsRoute
	// external is the namespace outside every mesh network that ingress clients run in,
	// and externalLinks the networks linked to it; both guarded by mu.
	external      *netlab.Namespace
	externalLinks map[string]bool
}

// Addressing inside the shared address space 100.64.0.0/10 (RFC 6598), which no pod CIDR
// of a topology should use:
//
//	100.64.255.<g>      network g's gateway, as every other network reaches it (g from 1)
//	100.100.<g>.1/.2    gateway g's namespace / network g's namespace (the inner link)
//	100.<80+g>.<n>.1/.2 gateway g's namespace / network n's namespace (outer links)
//
// Network n routes 100.64.255.<g> over its outer link to gateway g; gateway g routes its
// network's pod CIDRs over the inner link. Forwarding is off in every namespace.
func (e *localEnv) buildNetworks() error {
	for _, n := range e.t.Networks {
		ns, err := netlab.New("net")
		if err != nil {
			return fmt.Errorf("scenarios: network %s: %w", n.Name, err)
		}
		e.nets[n.Name] = &localNet{pods: ns}
		if err := ns.NoForwarding(); err != nil {
			return err
		}
	}
	for gi, n := range e.t.Networks {
		if !n.Gateway {
			continue
		}
		g := gi + 1
		ns, err := netlab.New("gw")
		if err != nil {
			return fmt.Errorf("scenarios: gateway of %s: %w", n.Name, err)
		}
		net := e.nets[n.Name]
		net.gateway, net.public = ns, netip.AddrFrom4([4]byte{100, 64, 255, byte(g)})
		steps := []error{ns.NoForwarding(), ns.AddAddr(net.public),
			netlab.Link(ns, net.pods, pfx(100, 100, g, 1), pfx(100, 100, g, 2))}
		fed := e.t.federationAddress(n.Name).Addr()
		if len(e.t.Meshes) > 0 {
			steps = append(steps, ns.AddAddr(fed))
		}
		for _, c := range e.t.Clusters {
			if c.Network == n.Name {
				cidr, _ := netip.ParsePrefix(c.PodCIDR)
				steps = append(steps, ns.Route(cidr.Masked(), netip.AddrFrom4([4]byte{100, 100, byte(g), 2})))
			}
		}
		for ni, other := range e.t.Networks {
			if other.Name == n.Name {
				continue
			}
			via := netip.AddrFrom4([4]byte{100, byte(80 + g), byte(ni + 1), 1})
			steps = append(steps, netlab.Link(ns, e.nets[other.Name].pods, pfx(100, 80+g, ni+1, 1), pfx(100, 80+g, ni+1, 2)))
			// Networks of the gateway's own mesh reach its in-mesh listener; every
			// network (other meshes' too) reaches its federation listener only.
			if e.sameMeshNetworks(n.Name, other.Name) {
				steps = append(steps, e.nets[other.Name].pods.Route(netip.PrefixFrom(net.public, 32), via))
			}
			if len(e.t.Meshes) > 0 {
				steps = append(steps, e.nets[other.Name].pods.Route(netip.PrefixFrom(fed, 32), via))
			}
		}
		for _, err := range steps {
			if err != nil {
				return fmt.Errorf("scenarios: gateway of %s: %w", n.Name, err)
			}
		}
	}
	return nil
}

// sameMeshNetworks reports whether networks a and b carry clusters of one mesh (always
// true for a topology of one mesh).
func (e *localEnv) sameMeshNetworks(a, b string) bool {
	if len(e.t.Meshes) == 0 {
		return true
	}
	ma, mb := "", ""
	for _, c := range e.t.Clusters {
		if c.Network == a {
			ma = c.Mesh
		}
		if c.Network == b {
			mb = c.Mesh
		}
	}
	return ma == mb
}

func pfx(a, b, c, d int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(a), byte(b), byte(c), byte(d)}), 24)
}

// Clusters implements Environment.
func (e *localEnv) Clusters() []*Cluster { return e.clusters }

func (e *localEnv) cluster(name string) (*Cluster, error) {
	for _, c := range e.clusters {
		if c.Name == name {
			return c, nil
		}
	}
	return nil, fmt.Errorf("scenarios: no cluster %q", name)
}

// NetworkCommand implements Environment.
func (e *localEnv) NetworkCommand(network string) []string {
	if n, ok := e.nets[network]; ok {
		return []string{"ip", "netns", "exec", n.pods.Name}
	}
	return nil
}

// StartPrimary implements Environment.
func (e *localEnv) StartPrimary(ctx context.Context, s PrimarySpec) (*Component, error) {
	c, err := e.cluster(s.Cluster)
	if err != nil {
		return nil, err
	}
	probe := 2 * time.Second
	if s.ProbeInterval > 0 {
		probe = s.ProbeInterval
	}
	return e.run(ctx, 6, func(ports []int) (*Component, []string) {
		// xDS is the secure port beside the CA, dialled by a name its serving
		// certificate holds (localhost); there is no plaintext port. ca-gateway is the
		// same port for the network gateway's forward, so streams through it show so.
		addr := map[string]string{"xds": "localhost:" + strconv.Itoa(ports[1]), "http": hostPort(ports[0]), "ca": hostPort(ports[1]),
			"bundle": hostPort(ports[2]), "ca-gateway": hostPort(ports[3])}
		kubeconfig := c.Kubeconfig
		if s.Kubeconfig != "" {
			kubeconfig = s.Kubeconfig
		}
		args := []string{"primary", "--kubeconfig", kubeconfig, "--cluster-id", c.Name, "--ca-dir", s.CADir,
			"--trust-domain", string(s.TrustDomain), "--http-address", addr["http"],
			"--ca-address", addr["ca"], "--debounce", "20ms", "--probe-interval", probe.String(),
			// A short refresh hint: peers see a new root within seconds (rotation tests).
			"--bundle-addr", addr["bundle"], "--bundle-refresh-hint", "2s"}
		if c.Network != "" {
			args = append(args, "--gateway-listener", string(c.Network)+"="+addr["ca-gateway"])
		}
		if s.StaleWindow > 0 {
			args = append(args, "--stale-window", s.StaleWindow.String())
		}
		if s.Mesh != "" {
			// The gossip port is fixed in the arguments, so a restarted primary is found
			// again by its peers. A short stale window: a failing peer's imports go within
			// seconds (the link-health policy the scenarios check).
			stale := 2 * time.Second
			if s.StaleWindow > 0 {
				stale = s.StaleWindow
			}
			addr["federation"], addr["gossip"] = hostPort(ports[4]), hostPort(ports[5])
			args = append(args, "--mesh-id", string(s.Mesh), "--federation-addr", addr["federation"], "--federation-dir", s.FederationDir,
				"--federation-gossip-addr", addr["gossip"], "--federation-trust-peers", "--federation-stale-window", stale.String())
			for _, g := range s.FederationGateways {
				args = append(args, "--federation-gateway", g)
			}
		}
		if s.FederationFollow != "" {
			stale := 2 * time.Second // as the endpoint's, above
			if s.StaleWindow > 0 {
				stale = s.StaleWindow
			}
			args = append(args, "--federation-follow", s.FederationFollow, "--federation-stale-window", stale.String())
		}
		return &Component{Kind: "primary", Name: "primary-" + c.Name, Cluster: c.Name, Network: c.Network, Addresses: addr}, args
	})
}

// StartGateway implements Environment.
func (e *localEnv) StartGateway(ctx context.Context, s GatewaySpec) (*Component, error) {
	n, ok := e.nets[string(s.Network)]
	if !ok || n.gateway == nil {
		return nil, fmt.Errorf("scenarios: network %s has no gateway namespace", s.Network)
	}
	public := netip.AddrPortFrom(n.public, 15443)
	c, err := e.cluster(s.Cluster)
	if err != nil {
		return nil, err
	}
	kubeconfig := c.Kubeconfig
	return e.run(ctx, 1, func(ports []int) (*Component, []string) {
		addr := map[string]string{"listen": public.String(), "http": hostPort(ports[0])}
		args := []string{"gateway", "--netns", n.gateway.Name, "--listen", public.String(), "--http-address", addr["http"],
			"--xds-address", s.XDS, "--network", string(s.Network), "--cluster-id", s.Cluster, "--idle-timeout", "5m",
			"--kubeconfig", kubeconfig, "--xds-root-cert", s.RootCert, "--service-account", SystemNamespace + "/" + GatewayServiceAccount}
		if s.XDSFromNetwork {
			args = append(args, "--xds-netns", n.pods.Name)
		}
		if s.ControlPlane != "" {
			args = append(args, "--forward", netip.AddrPortFrom(n.public, ControlPlanePort).String()+"="+s.ControlPlane)
		}
		if s.Federation.IsValid() {
			addr["federation"] = s.Federation.String()
			args = append(args, "--federation-listen", s.Federation.String())
		}
		return &Component{Kind: "gateway", Name: "gateway-" + string(s.Network), Cluster: s.Cluster, Network: s.Network, Addresses: addr, Public: public}, args
	})
}

// StartWorkload implements Environment.
func (e *localEnv) StartWorkload(ctx context.Context, s PodSpec) (*Component, error) {
	c, err := e.cluster(s.Cluster)
	if err != nil {
		return nil, err
	}
	listen, netns, err := e.podAddress(c, s.Index, s.Port)
	if err != nil {
		return nil, err
	}
	return e.run(ctx, 2, func(ports []int) (*Component, []string) {
		addr := map[string]string{"pod": listen.String(), "admin": hostPort(ports[0])}
		args := []string{"workload", "--kubeconfig", c.Kubeconfig, "--cluster-id", c.Name, "--network", string(c.Network),
			"--namespace", s.Namespace, "--pod", s.Pod, "--service-account", s.ServiceAccount, "--app", s.App,
			"--listen", listen.String(), "--admin-address", addr["admin"], "--xds-address", s.XDS, "--ca-address", s.CA,
			"--root-cert", s.RootCert, "--dir", filepath.Join(e.dir, "pods", c.Name, s.Pod)}
		if netns != "" {
			args = append(args, "--netns", netns)
		}
		if s.CertTTL > 0 {
			args = append(args, "--cert-ttl", s.CertTTL.String())
		}
		if s.XDSServer {
			args = append(args, "--xds-server")
		}
		if s.HTTPPort > 0 {
			args = append(args, "--http-port", strconv.Itoa(s.HTTPPort))
		}
		for _, k := range slices.Sorted(maps.Keys(s.Labels)) {
			args = append(args, "--label", k+"="+s.Labels[k])
		}
		if s.Locality != (mesh.Locality{}) {
			args = append(args, "--locality", s.Locality.String())
		}
		if s.ControlPlaneFromNetwork && netns != "" {
			// The pod's xDS client dials a relay on the host that connects from the
			// pod's network (grpc-go's xDS client takes no dialer).
			args = append(args, "--control-plane-from-netns", "--xds-relay-address", hostPort(ports[1]))
		}
		return &Component{Kind: "workload", Name: s.Pod, Cluster: c.Name, Network: c.Network, Addresses: addr}, args
	})
}

// StartIngress implements Environment: the proxy lives in the cluster's network
// namespace (a pod on that network) and listens on the network's side of a link to the
// external namespace, 100.120.<g>.1 (the external side is .2); the external namespace
// has no other route, and forwarding is off on both, so a client there reaches the
// ingress's ports and nothing else of the mesh.
func (e *localEnv) StartIngress(ctx context.Context, s IngressProxySpec) (*Component, error) {
	c, err := e.cluster(s.Cluster)
	if err != nil {
		return nil, err
	}
	public, err := e.externalLink(string(c.Network))
	if err != nil {
		return nil, err
	}
	n := e.nets[string(c.Network)]
	return e.run(ctx, 1, func(ports []int) (*Component, []string) {
		addr := map[string]string{"listen": public.String(), "http": hostPort(ports[0])}
		args := []string{"proxy", "--mode", "ingress", "--netns", n.pods.Name, "--listen-address", public.String(),
			"--http-address", addr["http"], "--xds-address", s.XDS, "--xds-root-cert", s.RootCert,
			"--kubeconfig", c.Kubeconfig, "--service-account", SystemNamespace + "/" + IngressServiceAccount,
			"--network", string(c.Network), "--cluster-id", c.Name, "--name", s.Name, "--label", "istio=ingressgateway",
			"--cert-dir", filepath.Join(e.dir, "ingress", s.Name)}
		return &Component{Kind: "ingress", Name: s.Name, Cluster: c.Name, Network: c.Network, Addresses: addr,
			Public: netip.AddrPortFrom(public, 0)}, args
	})
}

// externalLink returns the address an ingress on network listens on, creating the
// external namespace and its link to the network the first time.
func (e *localEnv) externalLink(network string) (netip.Addr, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	n, ok := e.nets[network]
	if !ok {
		return netip.Addr{}, ErrNeedsNamespaces
	}
	gi := slices.IndexFunc(e.t.Networks, func(s NetworkSpec) bool { return s.Name == network }) + 1
	public := netip.AddrFrom4([4]byte{100, 120, byte(gi), 1})
	if e.external == nil {
		ns, err := netlab.New("ext")
		if err != nil {
			return netip.Addr{}, fmt.Errorf("scenarios: external namespace: %w", err)
		}
		if err := ns.NoForwarding(); err != nil {
			ns.Close()
			return netip.Addr{}, err
		}
		e.external = ns
		e.externalLinks = map[string]bool{}
	}
	if !e.externalLinks[network] {
		if err := netlab.Link(n.pods, e.external, pfx(100, 120, gi, 1), pfx(100, 120, gi, 2)); err != nil {
			return netip.Addr{}, fmt.Errorf("scenarios: link the external namespace to %s: %w", network, err)
		}
		e.externalLinks[network] = true
	}
	return public, nil
}

// ExternalCommand implements Environment.
func (e *localEnv) ExternalCommand() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.external == nil {
		return nil
	}
	return []string{"ip", "netns", "exec", e.external.Name}
}

// podAddress gives pod index of cluster c its address: in the cluster's pod CIDR on its
// network's namespace, with the workload's port. Without namespaces every pod has the
// host's own address (Kubernetes refuses loopback endpoint addresses) and a port of its
// own.
func (e *localEnv) podAddress(c *Cluster, index, port int) (netip.AddrPort, string, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	n, ok := e.nets[string(c.Network)]
	if !ok {
		host, err := hostAddress()
		if err != nil {
			return netip.AddrPort{}, "", err
		}
		l, err := net.Listen("tcp", net.JoinHostPort(host.String(), "0"))
		if err != nil {
			return netip.AddrPort{}, "", fmt.Errorf("scenarios: find a free port on %s: %w", host, err)
		}
		defer l.Close()
		return netip.AddrPortFrom(host, uint16(l.Addr().(*net.TCPAddr).Port)), "", nil
	}
	spec, _ := e.t.Cluster(c.Name)
	cidr, _ := netip.ParsePrefix(spec.PodCIDR)
	b := cidr.Masked().Addr().As4()
	b[2] += byte(index / 200)
	b[3] = byte(10 + index%200)
	a := netip.AddrFrom4(b)
	if !e.podAddrs[a] {
		if err := n.pods.AddAddr(a); err != nil {
			return netip.AddrPort{}, "", err
		}
		e.podAddrs[a] = true
	}
	return netip.AddrPortFrom(a, uint16(port)), n.pods.Name, nil
}

// hostAddress returns an IPv4 address of this host that is not loopback: pods of a
// topology without separated networks share it.
func hostAddress() (netip.Addr, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, ifc := range ifaces {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is4() && !p.Addr().IsLinkLocalUnicast() {
				return p.Addr(), nil
			}
		}
	}
	return netip.Addr{}, errors.New("scenarios: this host has no non-loopback IPv4 address for pods (Kubernetes refuses loopback endpoints); run as root to use network namespaces")
}

// errPortTaken marks a component that could not bind a port picked for it.
var errPortTaken = errors.New("a port picked for it was taken meanwhile")

// run starts a component with nports free host ports, the process and its arguments built
// by build. A free port can be taken by another process before the component binds it, so
// a start that fails that way is tried again with new ports.
func (e *localEnv) run(ctx context.Context, nports int, build func(ports []int) (*Component, []string)) (*Component, error) {
	for attempt := 1; ; attempt++ {
		ports, err := freePorts(nports)
		if err != nil {
			return nil, err
		}
		comp, args := build(ports)
		comp, err = e.start(ctx, comp, args)
		if err == nil || attempt == 3 || !errors.Is(err, errPortTaken) {
			return comp, err
		}
	}
}

// start starts the component's process and waits for its /readyz (on the "http" or
// "admin" address).
func (e *localEnv) start(ctx context.Context, comp *Component, args []string) (*Component, error) {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil, errors.New("scenarios: environment closed")
	}
	e.mu.Unlock()
	logs := filepath.Join(e.dir, "logs")
	if err := os.MkdirAll(logs, 0o755); err != nil {
		return nil, err
	}
	comp.Log = filepath.Join(logs, comp.Name+".log")
	p, err := proc.Start(comp.Name, e.p.Binary, args, comp.Log, false, nil)
	if err != nil {
		return nil, err
	}
	comp.PID = p.PID()
	comp.stop = func() error { p.Stop(3 * time.Second); return nil }
	e.mu.Lock()
	e.comps = append(e.comps, comp)
	if e.args == nil {
		e.args = map[*Component][]string{}
	}
	e.args[comp] = args
	e.mu.Unlock()
	health := comp.Addresses["http"]
	if health == "" {
		health = comp.Addresses["admin"]
	}
	if err := waitReady(ctx, p, "http://"+health+"/readyz", 90*time.Second); err != nil {
		if p.Exited() && strings.Contains(proc.LogTail(comp.Log, 5), "address already in use") {
			return nil, fmt.Errorf("scenarios: %s: %w: %v", comp.Name, errPortTaken, err)
		}
		return nil, fmt.Errorf("scenarios: %s: %w", comp.Name, err)
	}
	return comp, nil
}

// waitReady polls url until it answers 200, the process exits, or timeout passes.
func waitReady(ctx context.Context, p *proc.Process, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	last := errors.New("no answer yet")
	for {
		if p.Exited() {
			return p.ExitError()
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("%s answered %s", url, resp.Status)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not ready after %s (%v); log: %s", timeout, last, p.LogPath)
		case <-p.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close implements Environment: components in reverse start order, then clusters, then
// namespaces (after every process that had sockets in them is gone).
func (e *localEnv) Close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	comps := e.comps
	e.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range comps {
		wg.Add(1)
		go func() { defer wg.Done(); c.Stop() }()
	}
	wg.Wait()
	for _, kc := range e.kube {
		wg.Add(1)
		go func() { defer wg.Done(); kc.Stop() }()
	}
	wg.Wait()
	var errs []error
	for _, n := range e.nets {
		for _, ns := range []*netlab.Namespace{n.gateway, n.pods} {
			if ns != nil {
				errs = append(errs, ns.Close())
			}
		}
	}
	if e.external != nil {
		errs = append(errs, e.external.Close())
	}
	return errors.Join(errs...)
}

// freePorts asks the kernel for n unused loopback ports. Another process may take one
// before the component binds it; run then tries again.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("scenarios: find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
