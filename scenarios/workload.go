package scenarios

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds" // also registers the xds:/// resolver and balancers
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/internal/httpserve"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

// WorkloadConfig configures one workload replica: a pod of a service, as a process.
type WorkloadConfig struct {
	// Cluster is the cluster the pod is in; required.
	Cluster mesh.ClusterID
	// Client is an API client of that cluster; required. The workload creates its Pod and
	// requests its service-account token with it.
	Client kubernetes.Interface
	// Namespace, Pod and ServiceAccount name the pod; App is its app label (what its
	// Service selects). All required.
	Namespace, Pod, ServiceAccount, App string
	// Listen is the pod's address and gRPC port; required.
	Listen netip.AddrPort
	// Netns, when set, is the network namespace the pod's sockets live in: its listener
	// and the connections of its probes. The CA, xDS and API connections stay on the host
	// (the control plane stands for cloud endpoints every network reaches).
	Netns *netlab.Namespace
	// CA is the CSR API of the cluster's control plane; required.
	CA pb.IstioCertificateServiceClient
	// Dir receives the certificate files (grpc-go's file_watcher layout); required.
	Dir string
	// AdminAddress serves /readyz and /probe on the host; required.
	AdminAddress string
	// CertTTL is the certificate validity to ask for; default 1 h.
	CertTTL time.Duration
	// XDSServer serves the echo service through grpc-go's xds.NewGRPCServer instead of a
	// plain TLS server: the server asks the primary for its inbound Listener (the
	// bootstrap's server_listener_resource_name_template), takes mTLS from its
	// certificate provider and enforces AuthorizationPolicy and PeerAuthentication as
	// RBAC. The pod is labelled primary.LabelXDSServer so the primary serves that
	// Listener, and the workload is ready only once the server is serving.
	XDSServer bool
	// Labels are added to the Pod's (e.g. version: v1, which DestinationRule subsets
	// select on); app and the TLS mode are always set.
	Labels map[string]string
	// HTTPPort, when set, also serves plain HTTP (HTTP/1.1 and HTTP/2) with mTLS on the
	// pod address at this port, its container port "http": each request is answered
	// with an HTTPAnswer, for ingress and HTTP clients (WorkloadSpec.HTTPPort).
	HTTPPort int
	// Log receives the workload's events; nil discards.
	Log *slog.Logger
}

// Answer is what one call of a probe saw.
type Answer struct {
	// Cluster and Pod answered.
	Cluster string `json:"cluster"`
	Pod     string `json:"pod"`
	// Peer is the address the connection went to: the pod itself, or a gateway.
	Peer string `json:"peer"`
	// ServerIdentity is the SPIFFE ID in the server's certificate.
	ServerIdentity string `json:"serverIdentity"`
	// CallerIdentity is the SPIFFE ID the server saw in the client's certificate.
	CallerIdentity string `json:"callerIdentity"`
}

// ProbeResult is the answer of a workload's /probe endpoint.
type ProbeResult struct {
	Target  string   `json:"target"`
	Answers []Answer `json:"answers"`
	// Errors are the failed calls' errors, deduplicated.
	Errors []string `json:"errors,omitempty"`
	// Failed counts failed calls.
	Failed int `json:"failed"`
	// Codes counts failed calls by gRPC status code name (e.g. "Unavailable").
	Codes map[string]int `json:"codes,omitempty"`
	// SlowestMS is the longest call, answered or failed, in milliseconds.
	SlowestMS int64 `json:"slowestMs"`
}

// RunWorkload runs a workload until ctx ends: it obtains a certificate for its identity
// from the CA with a real service-account token, serves the echo service with mTLS on
// Listen, and only then creates its Pod (so the EndpointSlice never lists a pod that cannot
// answer). It deletes the Pod when it stops.
//
// The echo service is grpc.testing.TestService: UnaryCall answers with ServerId = cluster,
// Hostname = pod and Username = the caller's SPIFFE ID. Probes use the process's xds:///
// resolver, whose bootstrap grpc-go reads from GRPC_XDS_BOOTSTRAP[_CONFIG].
func RunWorkload(ctx context.Context, cfg WorkloadConfig) error {
	if cfg.Client == nil || cfg.CA == nil || cfg.Cluster == "" || cfg.Namespace == "" || cfg.Pod == "" ||
		cfg.ServiceAccount == "" || cfg.App == "" || !cfg.Listen.IsValid() || cfg.Dir == "" || cfg.AdminAddress == "" {
		return errors.New("scenarios: workload: Cluster, Client, Namespace, Pod, ServiceAccount, App, Listen, CA, Dir and AdminAddress are required")
	}
	if cfg.CertTTL == 0 {
		cfg.CertTTL = time.Hour
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	w := &workload{cfg: cfg, channels: map[string]*grpc.ClientConn{}, trust: newWorkloadTrust(cfg.Dir)}
	defer w.closeChannels()
	w.gens = newGenerators(w)
	defer w.gens.stop("")

	agent, err := trust.NewAgent(trust.AgentConfig{CA: cfg.CA, Token: w.token, Cluster: cfg.Cluster, Dir: cfg.Dir, TTL: cfg.CertTTL, Log: cfg.Log,
		OnIssue: w.trust.onIssue(cfg.Log.Warn)})
	if err != nil {
		return err
	}
	w.agent = agent
	admin, err := net.Listen("tcp", cfg.AdminAddress)
	if err != nil {
		return fmt.Errorf("scenarios: workload: admin listener: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error { return w.watchBundles(gctx) })
	g.Go(func() error { return httpserve.Serve(gctx, admin, w.handler(), 2*time.Second) })
	g.Go(func() error { return w.serve(gctx) })
	err = g.Wait()
	if errors.Is(err, context.Canceled) || errors.Is(err, grpc.ErrServerStopped) {
		err = nil
	}
	return err
}

type workload struct {
	cfg   WorkloadConfig
	agent *trust.Agent
	trust *workloadTrust

	mu sync.Mutex
	// tok and tokExp cache the service-account token; guarded by mu.
	tok    string
	tokExp time.Time
	// ready is set once the Pod exists; guarded by mu.
	ready bool
	// channels are the probes' xDS channels by target; guarded by mu.
	channels map[string]*grpc.ClientConn
	// gens are the load generators (loadgen.go).
	gens *generators
	// failing makes the echo server fail every call with Unavailable (/fail), standing
	// for a broken pod in traffic checks.
	failing atomic.Bool
}

// token returns a token for the workload's service account with the CA's audience,
// requested from the API server and reused until ten minutes before it expires.
func (w *workload) token() (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.tok != "" && time.Until(w.tokExp) > 10*time.Minute {
		return w.tok, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	exp := int64(3600)
	tr, err := w.cfg.Client.CoreV1().ServiceAccounts(w.cfg.Namespace).CreateToken(ctx, w.cfg.ServiceAccount, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}, ExpirationSeconds: &exp},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("scenarios: workload: token for %s/%s: %w", w.cfg.Namespace, w.cfg.ServiceAccount, err)
	}
	w.tok, w.tokExp = tr.Status.Token, tr.Status.ExpirationTimestamp.Time
	return w.tok, nil
}

// serverTLS returns the TLS configuration of one handshake: the current certificate and
// the current bundles for the client's certificate.
func (w *workload) serverTLS(*tls.ClientHelloInfo) (*tls.Config, error) {
	cert, err := w.agent.KeyPair()
	if err != nil {
		return nil, err
	}
	// Callers are verified against their own trust domain's bundle (never a merged pool):
	// the CA's anchors, renewed with every certificate (a root rotation), and the peer
	// domains' bundles, which follow the bundle store without a restart.
	verify := func(raw [][]byte, chains [][]*x509.Certificate) error {
		err := w.trust.verifyCaller(raw, chains)
		if err != nil { // the caller only sees "bad certificate"; the reason is here
			w.cfg.Log.Warn("caller refused", "err", err)
		}
		return err
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, ClientAuth: tls.RequireAnyClientCert, VerifyPeerCertificate: verify,
		Certificates: []tls.Certificate{*cert}}, nil
}

// serve waits for the first certificate, serves the echo service, creates the Pod and
// deletes it again when ctx ends.
func (w *workload) serve(ctx context.Context) error {
	if !w.waitTrust(ctx) {
		return nil
	}
	if _, err := w.agent.KeyPair(); err != nil {
		return err
	}
	var (
		l   net.Listener
		err error
	)
	if w.cfg.Netns != nil {
		l, err = w.cfg.Netns.Listen(w.cfg.Listen.String())
	} else {
		l, err = net.Listen("tcp", w.cfg.Listen.String())
	}
	if err != nil {
		return fmt.Errorf("scenarios: workload: listen on the pod address %s: %w", w.cfg.Listen, err)
	}
	var (
		s       grpcServer
		serving chan struct{} // closed once an xDS server is serving (nil otherwise)
	)
	if w.cfg.XDSServer {
		if s, serving, err = w.newXDSServer(); err != nil {
			return err
		}
	} else {
		tc := &tls.Config{MinVersion: tls.VersionTLS12, ClientAuth: tls.RequireAndVerifyClientCert, GetConfigForClient: w.serverTLS}
		s = grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)), serverKeepalive)
	}
	testgrpc.RegisterTestServiceServer(s, &echoServer{cluster: string(w.cfg.Cluster), pod: w.cfg.Pod, failing: &w.failing})
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.Serve(l) }()
	defer s.Stop()

	if w.cfg.HTTPPort > 0 {
		hs, err := w.serveHTTP()
		if err != nil {
			return err
		}
		defer hs.Close()
	}
	if err := w.createPod(ctx); err != nil {
		return err
	}
	if serving != nil {
		// The primary serves the inbound Listener once it has seen the Pod's endpoint;
		// until then the server refuses connections.
		select {
		case <-ctx.Done():
			return nil
		case err := <-serveErr:
			return fmt.Errorf("scenarios: workload: serve: %w", err)
		case <-serving:
		}
	}
	w.mu.Lock()
	w.ready = true
	w.mu.Unlock()
	w.cfg.Log.Info("workload serving", "pod", w.cfg.Pod, "address", w.cfg.Listen.String())
	defer w.deletePod()
	select {
	case <-ctx.Done():
		return nil
	case err := <-serveErr:
		return fmt.Errorf("scenarios: workload: serve: %w", err)
	}
}

func (w *workload) createPod(ctx context.Context) error {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: w.cfg.Pod, Namespace: w.cfg.Namespace,
			Labels:      w.podLabels(),
			Annotations: map[string]string{kubelocal.PodIPAnnotation: w.cfg.Listen.Addr().String()}},
		Spec: corev1.PodSpec{ServiceAccountName: w.cfg.ServiceAccount, Containers: []corev1.Container{{
			Name: "workload", Image: "isthmus-workload",
			Ports: w.containerPorts(),
		}}},
	}
	pods := w.cfg.Client.CoreV1().Pods(w.cfg.Namespace)
	// A Pod left by an earlier process of the same name is replaced.
	if err := pods.Delete(ctx, w.cfg.Pod, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("scenarios: workload: delete stale pod: %w", err)
	}
	for {
		_, err := pods.Create(ctx, pod, metav1.CreateOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("scenarios: workload: create pod %s/%s: %w", w.cfg.Namespace, w.cfg.Pod, err)
		}
		select { // the stale pod is still terminating
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// containerPorts are the pod's named ports, which its Service's target ports name.
func (w *workload) containerPorts() []corev1.ContainerPort {
	ports := []corev1.ContainerPort{{Name: "grpc", ContainerPort: int32(w.cfg.Listen.Port())}}
	if w.cfg.HTTPPort > 0 {
		ports = append(ports, corev1.ContainerPort{Name: "http", ContainerPort: int32(w.cfg.HTTPPort)})
	}
	return ports
}

// HTTPAnswer is what the workload's HTTP port answers (as JSON): who answered, whom it
// saw, and the request as it arrived.
type HTTPAnswer struct {
	Cluster string `json:"cluster"`
	Pod     string `json:"pod"`
	// CallerIdentity is the SPIFFE ID in the client's certificate (the proxy's, for a
	// call through an ingress).
	CallerIdentity string `json:"callerIdentity"`
	Method         string `json:"method"`
	Host           string `json:"host"`
	Path           string `json:"path"`
	Proto          string `json:"proto"`
	// ForwardedFor is the X-Forwarded-For header the request arrived with.
	ForwardedFor string `json:"forwardedFor,omitempty"`
}

// serveHTTP serves HTTPAnswers on the HTTP port with the echo server's mTLS (callers
// verified against their own trust domain's bundle), HTTP/2 by ALPN.
func (w *workload) serveHTTP() (*http.Server, error) {
	addr := netip.AddrPortFrom(w.cfg.Listen.Addr(), uint16(w.cfg.HTTPPort)).String()
	var (
		l   net.Listener
		err error
	)
	if w.cfg.Netns != nil {
		l, err = w.cfg.Netns.Listen(addr)
	} else {
		l, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("scenarios: workload: listen on the pod's HTTP address %s: %w", addr, err)
	}
	hs := &http.Server{ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(w.cfg.Log.Handler(), slog.LevelDebug),
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"},
			GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
				c, err := w.serverTLS(hi)
				if err == nil {
					c.NextProtos = []string{"h2", "http/1.1"}
				}
				return c, err
			}},
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			if w.failing.Load() {
				http.Error(rw, "failing (/fail)", http.StatusServiceUnavailable)
				return
			}
			a := HTTPAnswer{Cluster: string(w.cfg.Cluster), Pod: w.cfg.Pod, Method: r.Method, Host: r.Host,
				Path: r.URL.RequestURI(), Proto: r.Proto, ForwardedFor: r.Header.Get("X-Forwarded-For")}
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 && len(r.TLS.PeerCertificates[0].URIs) == 1 {
				a.CallerIdentity = r.TLS.PeerCertificates[0].URIs[0].String()
			}
			rw.Header().Set("Content-Type", "application/json")
			json.NewEncoder(rw).Encode(a)
		})}
	go hs.ServeTLS(l, "", "")
	return hs, nil
}

func (w *workload) deletePod() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := w.cfg.Client.CoreV1().Pods(w.cfg.Namespace).Delete(ctx, w.cfg.Pod, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	if err != nil && !apierrors.IsNotFound(err) {
		w.cfg.Log.Warn("delete pod", "err", err)
	}
}

func (w *workload) handler() http.Handler {
	mux := http.NewServeMux()
	w.gens.routes(mux)
	mux.HandleFunc("/readyz", func(rw http.ResponseWriter, _ *http.Request) {
		w.mu.Lock()
		ready := w.ready
		w.mu.Unlock()
		if !ready {
			http.Error(rw, "not ready: waiting for a certificate and the pod", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(rw, "ok")
	})
	mux.HandleFunc("/fail", func(rw http.ResponseWriter, r *http.Request) {
		on, err := strconv.ParseBool(r.URL.Query().Get("on"))
		if err != nil {
			http.Error(rw, "on: want true or false", http.StatusBadRequest)
			return
		}
		w.failing.Store(on)
		fmt.Fprintf(rw, "failing=%v\n", on)
	})
	mux.HandleFunc("/probe", func(rw http.ResponseWriter, r *http.Request) {
		target := r.URL.Query().Get("target")
		calls, err := strconv.Atoi(r.URL.Query().Get("calls"))
		if err != nil || calls < 1 || calls > 1000 {
			http.Error(rw, "calls: want a number from 1 to 1000", http.StatusBadRequest)
			return
		}
		if _, _, err := net.SplitHostPort(target); err != nil {
			http.Error(rw, "target: want <hostname>:<port>", http.StatusBadRequest)
			return
		}
		var until probeUntil
		if c := r.URL.Query().Get("until"); c != "" {
			if until.within, err = time.ParseDuration(r.URL.Query().Get("within")); err != nil || until.within <= 0 || until.within > time.Minute {
				http.Error(rw, "within: want a duration up to 1m with until", http.StatusBadRequest)
				return
			}
			until.cluster = c
		}
		var md []string
		for _, h := range r.URL.Query()["header"] {
			k, v, ok := strings.Cut(h, ":")
			if !ok || k == "" {
				http.Error(rw, "header: want name:value", http.StatusBadRequest)
				return
			}
			md = append(md, strings.ToLower(k), v)
		}
		res, err := w.probe(metadata.AppendToOutgoingContext(r.Context(), md...), target, calls, r.URL.Query().Get("fresh") == "1", until)
		if err != nil {
			http.Error(rw, err.Error(), http.StatusInternalServerError)
			return
		}
		rw.Header().Set("Content-Type", "application/json")
		json.NewEncoder(rw).Encode(res)
	})
	return mux
}

// channel returns the probe channel for target, created on first use: grpc-go's proxyless
// xDS client with mTLS from the xDS security config (file_watcher certificates).
func (w *workload) channel(target string) (*grpc.ClientConn, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if cc, ok := w.channels[target]; ok {
		return cc, nil
	}
	cc, err := w.newChannel(target)
	if err != nil {
		return nil, err
	}
	w.channels[target] = cc
	return cc, nil
}

// clientKeepalive is the workloads' gRPC keepalive: a connection silent for 10 s (the
// shortest interval grpc-go lets a client ping at) is pinged and closed when no answer
// comes within 2 s. A partition leaves connections open but dead (nothing resets them);
// without keepalive the balancer kept sending calls down them, each failing only at its
// deadline, for as long as the partition lasted. With it a dead connection is closed
// about 12 s into the silence and calls go to the endpoints still reachable.
var clientKeepalive = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 2 * time.Second, PermitWithoutStream: true}

// serverKeepalive lets clients ping every clientKeepalive.Time / 2 when a connection is
// silent; the default policy (one ping per 5 minutes) would answer them with GOAWAY
// too_many_pings.
var serverKeepalive = grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: clientKeepalive.Time / 2, PermitWithoutStream: true})

// newChannel makes a channel to target; its connections are new handshakes.
func (w *workload) newChannel(target string) (*grpc.ClientConn, error) {
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds), grpc.WithKeepaliveParams(clientKeepalive)}
	if w.cfg.Netns != nil {
		opts = append(opts, grpc.WithContextDialer(w.cfg.Netns.Dial))
	}
	cc, err := grpc.NewClient("xds:///"+target, opts...)
	if err != nil {
		return nil, fmt.Errorf("scenarios: workload: channel to %s: %w", target, err)
	}
	return cc, nil
}

func (w *workload) closeChannels() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cc := range w.channels {
		cc.Close()
	}
}

// probeUntil, when cluster is set, makes a probe call until that cluster answers (then
// stops) or within has passed, with up to the probe's calls: a fresh channel's first calls
// all go to whichever endpoint connected first, so a fixed number of calls says nothing
// about an endpoint whose handshake is merely slower (through a gateway, on a loaded
// machine); a cluster that does not answer within a bound does not answer.
type probeUntil struct {
	cluster string
	within  time.Duration
}

// probe makes calls to target and reports every answer. fresh makes them on a channel of
// their own, so every endpoint is reached with a new handshake (what a change of trust
// shows on first).
func (w *workload) probe(ctx context.Context, target string, calls int, fresh bool, until probeUntil) (*ProbeResult, error) {
	cc, err := w.channel(target)
	if fresh {
		if cc, err = w.newChannel(target); err == nil {
			defer cc.Close()
		}
	}
	if err != nil {
		return nil, err
	}
	client := testgrpc.NewTestServiceClient(cc)
	res := &ProbeResult{Target: target}
	seen := map[string]bool{}
	deadline := time.Now().Add(until.within)
	for i := range calls {
		if until.cluster != "" && i > 0 {
			if time.Now().After(deadline) {
				break
			}
			select { // polled: a call to a connected endpoint takes a millisecond
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(10 * time.Millisecond):
			}
		}
		var p peer.Peer
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		start := time.Now()
		r, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{}, grpc.Peer(&p))
		res.SlowestMS = max(res.SlowestMS, time.Since(start).Milliseconds())
		cancel()
		if err != nil {
			res.Failed++
			if res.Codes == nil {
				res.Codes = map[string]int{}
			}
			res.Codes[status.Code(err).String()]++
			if msg := err.Error(); !seen[msg] {
				seen[msg] = true
				res.Errors = append(res.Errors, msg)
			}
			continue
		}
		a := Answer{Cluster: r.GetServerId(), Pod: r.GetHostname(), CallerIdentity: r.GetUsername()}
		if p.Addr != nil {
			a.Peer = p.Addr.String()
		}
		a.ServerIdentity = peerIdentity(p.AuthInfo)
		res.Answers = append(res.Answers, a)
		if until.cluster != "" && a.Cluster == until.cluster {
			break
		}
	}
	return res, nil
}

// peerIdentity returns the first URI SAN of the peer's leaf certificate, or "".
func peerIdentity(ai credentials.AuthInfo) string {
	ti, ok := ai.(credentials.TLSInfo)
	if !ok || len(ti.State.PeerCertificates) == 0 || len(ti.State.PeerCertificates[0].URIs) == 0 {
		return ""
	}
	return ti.State.PeerCertificates[0].URIs[0].String()
}

// echoServer answers UnaryCall with who answered and whom it saw, after the call's
// "sleep-ms" metadata (bounded by its deadline); while failing is set it fails every call
// with Unavailable.
type echoServer struct {
	testgrpc.UnimplementedTestServiceServer
	cluster, pod string
	failing      *atomic.Bool
}

func (e *echoServer) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if e.failing != nil && e.failing.Load() {
		return nil, status.Error(codes.Unavailable, "scenarios: this pod is failing (/fail)")
	}
	if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("sleep-ms")) > 0 {
		ms, err := strconv.Atoi(md.Get("sleep-ms")[0])
		if err != nil || ms < 0 || ms > 60000 {
			return nil, status.Error(codes.InvalidArgument, "sleep-ms: want 0..60000")
		}
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	caller := ""
	if p, ok := peer.FromContext(ctx); ok {
		caller = peerIdentity(p.AuthInfo)
	}
	return &testgrpc.SimpleResponse{ServerId: e.cluster, Hostname: e.pod, Username: caller}, nil
}

// FileRefresh is how often grpc-go's file_watcher re-reads a workload's certificate files
// and bundle map for certificates of the given validity: 5 s, or a tenth of the validity
// when that is shorter. The agent renews at half of a certificate's life, so the new one
// must be picked up well within the other half: with 10 s certificates and a 5 s refresh,
// a client could present its old certificate up to the moment it expires (and past it, by
// the renewal's own latency), and servers refuse it (tls: bad certificate).
func FileRefresh(certTTL time.Duration) time.Duration {
	const dflt = 5 * time.Second
	if certTTL <= 0 || certTTL/10 >= dflt {
		return dflt
	}
	return max(certTTL/10, 100*time.Millisecond)
}

// XDSBootstrap returns a grpc-go xDS bootstrap for a workload: the xDS server, the node
// (cluster and network in its metadata, as the primary reads them) and the file_watcher
// certificate provider over dir (the Agent's files), re-read every FileRefresh(certTTL).
// The node's locality is the pod's (its node's region and zone), which locality
// failover prefers.
func XDSBootstrap(xdsAddress string, cluster mesh.ClusterID, network mesh.NetworkID, locality mesh.Locality, namespace, pod, ip, dir string, certTTL time.Duration) ([]byte, error) {
	refresh := fmt.Sprintf("%gs", FileRefresh(certTTL).Seconds()) // JSON of a protobuf Duration
	b := map[string]any{
		"xds_servers": []any{map[string]any{
			// The primary's secure port: TLS verified against the mesh root, and the
			// workload's own mesh certificate as its credential (gRFC A65), re-read
			// from the files the agent renews.
			"server_uri": xdsAddress, "server_features": []string{"xds_v3"},
			"channel_creds": []any{map[string]any{"type": "tls", "config": map[string]any{
				"certificate_file":    filepath.Join(dir, trust.AgentCertFile),
				"private_key_file":    filepath.Join(dir, trust.AgentKeyFile),
				"ca_certificate_file": filepath.Join(dir, trust.AgentRootFile),
				"refresh_interval":    refresh,
			}}},
		}},
		// What an xDS-enabled server asks for (gRFC A36); unused by clients.
		"server_listener_resource_name_template": primary.InboundListenerTemplate,
		"node": map[string]any{
			"id":       fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, pod, namespace, namespace),
			"metadata": map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": string(cluster), "NETWORK": string(network)},
		},
		"certificate_providers": map[string]any{mesh.CertProviderInstance: map[string]any{
			"plugin_name": "file_watcher",
			"config": map[string]any{
				"certificate_file":    filepath.Join(dir, trust.AgentCertFile),
				"private_key_file":    filepath.Join(dir, trust.AgentKeyFile),
				"ca_certificate_file": filepath.Join(dir, trust.AgentRootFile),
				// Preferred by grpc-go over ca_certificate_file when
				// GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE=true: one bundle per trust domain.
				"spiffe_trust_bundle_map_file": trust.BundleMapPath(dir),
				"refresh_interval":             refresh,
			},
		}},
	}
	if locality != (mesh.Locality{}) {
		b["node"].(map[string]any)["locality"] = map[string]any{"region": locality.Region, "zone": locality.Zone, "sub_zone": locality.Subzone}
	}
	return json.Marshal(b)
}

// grpcServer is what serve needs of grpc.Server and xds.GRPCServer alike.
type grpcServer interface {
	grpc.ServiceRegistrar
	Serve(net.Listener) error
	Stop()
}

// newXDSServer returns an xDS-enabled server whose transport security comes from its
// inbound Listener (plaintext only where the Listener asks for none), and a channel closed
// the first time it reports SERVING. Mode changes are logged: NOT_SERVING says the
// primary has no Listener for the address (or sent one grpc-go refused).
func (w *workload) newXDSServer() (*xds.GRPCServer, chan struct{}, error) {
	creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return nil, nil, fmt.Errorf("scenarios: workload: xDS server credentials: %w", err)
	}
	serving := make(chan struct{})
	var once sync.Once
	mode := xds.ServingModeCallback(func(addr net.Addr, args xds.ServingModeChangeArgs) {
		w.cfg.Log.Info("xDS server mode", "address", addr.String(), "mode", args.Mode, "err", args.Err)
		if args.Mode == connectivity.ServingModeServing {
			once.Do(func() { close(serving) })
		}
	})
	s, err := xds.NewGRPCServer(grpc.Creds(creds), mode, serverKeepalive)
	if err != nil {
		return nil, nil, fmt.Errorf("scenarios: workload: xDS server: %w", err)
	}
	return s, serving, nil
}

// podLabels are the Pod's labels: the extra Labels, then its app, Istio's tlsMode (it
// terminates mTLS) and, for an xDS-enabled server, primary.LabelXDSServer, which no extra
// label overrides.
func (w *workload) podLabels() map[string]string {
	l := maps.Clone(w.cfg.Labels)
	if l == nil {
		l = map[string]string{}
	}
	l["app"], l[primary.LabelTLSMode] = w.cfg.App, primary.TLSModeIstio
	if w.cfg.XDSServer {
		l[primary.LabelXDSServer] = "true"
	}
	return l
}
