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
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
	_ "google.golang.org/grpc/xds" // registers the xds:/// resolver and balancers
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

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
	w := &workload{cfg: cfg, channels: map[string]*grpc.ClientConn{}}
	defer w.closeChannels()

	agent, err := trust.NewAgent(trust.AgentConfig{CA: cfg.CA, Token: w.token, Cluster: cfg.Cluster, Dir: cfg.Dir, TTL: cfg.CertTTL, Log: cfg.Log})
	if err != nil {
		return err
	}
	w.agent = agent
	admin, err := net.Listen("tcp", cfg.AdminAddress)
	if err != nil {
		return fmt.Errorf("scenarios: workload: admin listener: %w", err)
	}
	hs := &http.Server{Handler: w.handler(), ReadHeaderTimeout: 5 * time.Second}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return agent.Run(gctx) })
	g.Go(func() error {
		if err := hs.Serve(admin); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return hs.Shutdown(sctx)
	})
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

	mu sync.Mutex
	// tok and tokExp cache the service-account token; guarded by mu.
	tok    string
	tokExp time.Time
	// cert and certSerial cache the key pair on disk; guarded by mu.
	cert       *tls.Certificate
	certSerial string
	// ready is set once the Pod exists; guarded by mu.
	ready bool
	// channels are the probes' xDS channels by target; guarded by mu.
	channels map[string]*grpc.ClientConn
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

// keyPair returns the certificate on disk, re-read when the agent has renewed it.
func (w *workload) keyPair() (*tls.Certificate, error) {
	cur := w.agent.Current()
	if cur == nil {
		return nil, errors.New("scenarios: workload: no certificate yet")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cert != nil && w.certSerial == cur.SerialNumber.String() {
		return w.cert, nil
	}
	c, err := tls.LoadX509KeyPair(filepath.Join(w.cfg.Dir, trust.AgentCertFile), filepath.Join(w.cfg.Dir, trust.AgentKeyFile))
	if err != nil {
		return nil, err
	}
	w.cert, w.certSerial = &c, cur.SerialNumber.String()
	return w.cert, nil
}

// serve waits for the first certificate, serves the echo service, creates the Pod and
// deletes it again when ctx ends.
func (w *workload) serve(ctx context.Context) error {
	for w.agent.Current() == nil {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(50 * time.Millisecond):
		}
	}
	rootPEM, err := os.ReadFile(filepath.Join(w.cfg.Dir, trust.AgentRootFile))
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return errors.New("scenarios: workload: the CA's root is not PEM")
	}
	var l net.Listener
	if w.cfg.Netns != nil {
		l, err = w.cfg.Netns.Listen(w.cfg.Listen.String())
	} else {
		l, err = net.Listen("tcp", w.cfg.Listen.String())
	}
	if err != nil {
		return fmt.Errorf("scenarios: workload: listen on the pod address %s: %w", w.cfg.Listen, err)
	}
	tc := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      roots,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return w.keyPair() },
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	testgrpc.RegisterTestServiceServer(s, &echoServer{cluster: string(w.cfg.Cluster), pod: w.cfg.Pod})
	serveErr := make(chan error, 1)
	go func() { serveErr <- s.Serve(l) }()
	defer s.Stop()

	if err := w.createPod(ctx); err != nil {
		return err
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
			Labels:      map[string]string{"app": w.cfg.App, primary.LabelTLSMode: primary.TLSModeIstio},
			Annotations: map[string]string{kubelocal.PodIPAnnotation: w.cfg.Listen.Addr().String()}},
		Spec: corev1.PodSpec{ServiceAccountName: w.cfg.ServiceAccount, Containers: []corev1.Container{{
			Name: "workload", Image: "isthmus-workload",
			Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: int32(w.cfg.Listen.Port())}},
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
		res, err := w.probe(r.Context(), target, calls)
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
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if w.cfg.Netns != nil {
		opts = append(opts, grpc.WithContextDialer(w.cfg.Netns.Dial))
	}
	cc, err := grpc.NewClient("xds:///"+target, opts...)
	if err != nil {
		return nil, fmt.Errorf("scenarios: workload: channel to %s: %w", target, err)
	}
	w.channels[target] = cc
	return cc, nil
}

func (w *workload) closeChannels() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, cc := range w.channels {
		cc.Close()
	}
}

// probe makes calls to target and reports every answer.
func (w *workload) probe(ctx context.Context, target string, calls int) (*ProbeResult, error) {
	cc, err := w.channel(target)
	if err != nil {
		return nil, err
	}
	client := testgrpc.NewTestServiceClient(cc)
	res := &ProbeResult{Target: target}
	seen := map[string]bool{}
	for range calls {
		var p peer.Peer
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		r, err := client.UnaryCall(cctx, &testgrpc.SimpleRequest{}, grpc.Peer(&p))
		cancel()
		if err != nil {
			res.Failed++
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

// echoServer answers UnaryCall with who answered and whom it saw.
type echoServer struct {
	testgrpc.UnimplementedTestServiceServer
	cluster, pod string
}

func (e *echoServer) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	caller := ""
	if p, ok := peer.FromContext(ctx); ok {
		caller = peerIdentity(p.AuthInfo)
	}
	return &testgrpc.SimpleResponse{ServerId: e.cluster, Hostname: e.pod, Username: caller}, nil
}

// XDSBootstrap returns a grpc-go xDS bootstrap for a workload: the xDS server, the node
// (cluster and network in its metadata, as the primary reads them) and the file_watcher
// certificate provider over dir (the Agent's files).
func XDSBootstrap(xdsAddress string, cluster mesh.ClusterID, network mesh.NetworkID, namespace, pod, ip, dir string) ([]byte, error) {
	b := map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri": xdsAddress, "channel_creds": []any{map[string]any{"type": "insecure"}}, "server_features": []string{"xds_v3"},
		}},
		"node": map[string]any{
			"id":       fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, pod, namespace, namespace),
			"metadata": map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": string(cluster), "NETWORK": string(network)},
		},
		"certificate_providers": map[string]any{primary.CertProviderInstance: map[string]any{
			"plugin_name": "file_watcher",
			"config": map[string]any{
				"certificate_file":    filepath.Join(dir, trust.AgentCertFile),
				"private_key_file":    filepath.Join(dir, trust.AgentKeyFile),
				"ca_certificate_file": filepath.Join(dir, trust.AgentRootFile),
				"refresh_interval":    "5s",
			},
		}},
	}
	return json.Marshal(b)
}
