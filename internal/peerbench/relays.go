package peerbench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/isthmus-mesh/isthmus/eastwest"
	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/mesh"
)

// Relay names, the columns of the table.
const (
	Isthmus = "isthmus"
	Nginx   = "nginx"
	HAProxy = "haproxy"
)

// Paths of the peers as Debian installs them.
const (
	nginxBin     = "/usr/sbin/nginx"
	nginxStream  = "/usr/lib/nginx/modules/ngx_stream_module.so"
	haproxyBin   = "/usr/sbin/haproxy"
	gatewayEnv   = "ISTHMUS_PEERBENCH_GATEWAY"
	debianPkgs   = "nginx libnginx-mod-stream haproxy"
	maxIdleConns = 4000 // each relay is configured for this many proxied connections
)

// Ensure installs nginx (with its stream module) and HAProxy from Debian's packages when
// either is missing, as .ci/run installs iproute2: `apt-get update`, then `apt-get install
// -y`, with services kept from starting (policy-rc.d, when the image has one, already
// refuses; RUNLEVEL=1 covers the rest). It returns an error saying why when they are
// missing and cannot be installed (not root, no apt-get, the install failed); callers
// that are tests skip with that reason. progress receives apt's output; nil discards it.
func Ensure(ctx context.Context, progress io.Writer) error {
	if installed() {
		return nil
	}
	if progress == nil {
		progress = io.Discard
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("peerbench: %s not installed and not root to install them (apt-get install %s)", missing(), debianPkgs)
	}
	apt, err := exec.LookPath("apt-get")
	if err != nil {
		return fmt.Errorf("peerbench: %s not installed and no apt-get: %w", missing(), err)
	}
	fmt.Fprintf(progress, "installing %s\n", debianPkgs)
	for _, args := range [][]string{{"update", "-qq"}, append([]string{"install", "-y", "-qq", "--no-install-recommends"}, strings.Fields(debianPkgs)...)} {
		cmd := exec.CommandContext(ctx, apt, args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "RUNLEVEL=1")
		cmd.Stdout, cmd.Stderr = progress, progress
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("peerbench: apt-get %s: %w", args[0], err)
		}
	}
	if !installed() {
		return fmt.Errorf("peerbench: %s still missing after apt-get install %s", missing(), debianPkgs)
	}
	return nil
}

func installed() bool { return missing() == "" }

// missing names the peer files not on this machine, "" when all are.
func missing() string {
	var out []string
	for _, p := range []string{nginxBin, nginxStream, haproxyBin} {
		if _, err := os.Stat(p); err != nil {
			out = append(out, p)
		}
	}
	return strings.Join(out, ", ")
}

// Versions returns the peers' version lines, for the report.
func Versions() map[string]string {
	v := map[string]string{}
	if out, err := exec.Command(nginxBin, "-v").CombinedOutput(); err == nil {
		v[Nginx] = strings.TrimSpace(strings.TrimPrefix(string(out), "nginx version: "))
	}
	if out, err := exec.Command(haproxyBin, "-v").Output(); err == nil {
		line, _, _ := strings.Cut(string(out), "\n")
		v[HAProxy] = strings.TrimSpace(line)
	}
	return v
}

// relay is one running relay process listening on addr.
type relay struct {
	name string
	addr string
	p    *proc.Process
}

// startRelay writes name's configuration under dir for routes (server name → backend)
// and starts it listening on 127.0.0.1:port, one worker or thread, as a child process.
// A name LABEL=PATH with LABEL starting "isthmus" runs the gateway of another build of
// benchpeers (PATH), for before/after comparisons in one interleaved run.
func startRelay(name, dir string, port int, routes map[string]netip.AddrPort) (*relay, error) {
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	names := slices.Sorted(maps.Keys(routes))
	kind, other := name, ""
	if label, path, ok := strings.Cut(name, "="); ok && strings.HasPrefix(label, Isthmus) {
		kind, other = Isthmus, path
	}
	var bin string
	var args, env []string
	switch kind {
	case Nginx:
		var m strings.Builder
		for _, sni := range names {
			fmt.Fprintf(&m, "        %s %s;\n", sni, routes[sni])
		}
		// proxy_buffer_size and the preread buffer stay at their defaults (16k); an unknown
		// name maps to a closed port, so nginx refuses it as the gateway does.
		conf := fmt.Sprintf(`load_module %s;
daemon off;
worker_processes 1;
worker_rlimit_nofile %d;
pid %s;
error_log %s warn;
events { worker_connections %d; }
stream {
    map $ssl_preread_server_name $upstream {
%s        default 127.0.0.1:1;
    }
    server {
        listen %s;
        ssl_preread on;
        proxy_pass $upstream;
        proxy_connect_timeout 5s;
        proxy_timeout 1h;
    }
}
`, nginxStream, 2*maxIdleConns+100, filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "nginx-error.log"), 2*maxIdleConns+50, m.String(), listen)
		path := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			return nil, fmt.Errorf("peerbench: write nginx config: %w", err)
		}
		bin, args = nginxBin, []string{"-p", dir, "-c", path, "-e", filepath.Join(dir, "nginx-error.log")}
	case HAProxy:
		var m strings.Builder
		var backends strings.Builder
		for i, sni := range names {
			fmt.Fprintf(&m, "%s be%d\n", sni, i)
			fmt.Fprintf(&backends, "backend be%d\n    server s0 %s\n", i, routes[sni])
		}
		mapPath := filepath.Join(dir, "sni.map")
		if err := os.WriteFile(mapPath, []byte(m.String()), 0o644); err != nil {
			return nil, fmt.Errorf("peerbench: write haproxy map: %w", err)
		}
		// The SNI is looked up in a map (as the nginx map), so both scale with routes the
		// same way; a name not in the map matches no backend and the connection is closed.
		conf := fmt.Sprintf(`global
    nbthread 1
    maxconn %d
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend sni
    bind %s
    tcp-request inspect-delay 10s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend %%[req.ssl_sni,map(%s)]
%s`, maxIdleConns, listen, mapPath, backends.String())
		path := filepath.Join(dir, "haproxy.cfg")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			return nil, fmt.Errorf("peerbench: write haproxy config: %w", err)
		}
		bin, args = haproxyBin, []string{"-db", "-f", path}
	case Isthmus:
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("peerbench: find own binary for the gateway: %w", err)
		}
		if other != "" {
			exe = other
		}
		spec := []string{listen}
		for _, sni := range names {
			spec = append(spec, sni+"="+routes[sni].String())
		}
		bin, env = exe, []string{gatewayEnv + "=" + strings.Join(spec, ","), "GOMAXPROCS=1"}
	default:
		return nil, fmt.Errorf("peerbench: unknown relay %q", name)
	}
	if other != "" {
		name, _, _ = strings.Cut(name, "=")
	}
	p, err := proc.Start(name, bin, args, filepath.Join(dir, name+".log"), false, env)
	if err != nil {
		return nil, fmt.Errorf("peerbench: %w", err)
	}
	r := &relay{name: name, addr: listen, p: p}
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", listen, time.Second)
		if err == nil {
			c.Close()
			return r, nil
		}
		if p.Exited() || time.Now().After(deadline) {
			p.Stop(time.Second)
			if p.Exited() {
				return nil, fmt.Errorf("peerbench: %w", p.ExitError())
			}
			return nil, fmt.Errorf("peerbench: %s not listening on %s after 20 s", name, listen)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (r *relay) stop() { r.p.Stop(5 * time.Second) }

// ProfileEnv, when set in Run's environment, names the file the gateway relay writes
// its CPU profile to (for where the gateway's time goes, not for the table).
const ProfileEnv = "ISTHMUS_PEERBENCH_CPUPROFILE"

// ServeGatewayIfChild serves the gateway and exits when this process was started by Run
// as its Isthmus relay; otherwise it returns at once. Call it first thing in main or
// TestMain. RunHTTP's isthmus relay is served the same way (serveIngress). The child is eastwest.Gateway with the defaults of `isthmus gateway` and a
// static table, listening where Run says, until SIGTERM.
func ServeGatewayIfChild() {
	if spec, ok := os.LookupEnv(ingressEnv); ok { // RunHTTP's isthmus proxy relay
		if err := serveIngress(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	spec, ok := os.LookupEnv(gatewayEnv)
	if !ok {
		return
	}
	if err := serveGateway(spec); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// serveGateway parses "LISTEN,SNI=ADDR,..." and serves until SIGTERM or SIGINT.
func serveGateway(spec string) error {
	parts := strings.Split(spec, ",")
	routes := map[string][]netip.AddrPort{}
	for _, p := range parts[1:] {
		sni, addr, ok := strings.Cut(p, "=")
		if !ok {
			return fmt.Errorf("peerbench gateway: route %q: want SNI=ADDR", p)
		}
		n, err := mesh.ParseSNI(sni)
		if err != nil {
			return fmt.Errorf("peerbench gateway: route %q: %w", p, err)
		}
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return fmt.Errorf("peerbench gateway: route %q: %w", p, err)
		}
		routes[n.ClusterName()] = []netip.AddrPort{ap}
	}
	table := &eastwest.Table{}
	table.Update(routes)
	gw, err := eastwest.New(eastwest.Config{Routes: table, Metrics: prometheus.NewRegistry(),
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		return fmt.Errorf("peerbench gateway: %w", err)
	}
	l, err := net.Listen("tcp", parts[0])
	if err != nil {
		return fmt.Errorf("peerbench gateway: %w", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if path := os.Getenv(ProfileEnv); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("peerbench gateway: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("peerbench gateway: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		gw.Shutdown(sctx)
	}()
	if err := gw.Serve(l); err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("peerbench gateway: %w", err)
	}
	return nil
}
