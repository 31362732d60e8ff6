package proxy_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/structpb"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/proxy"
)

const gatewayYAML = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [echo.example.com, other.example.com]
    tls: {mode: SIMPLE, credentialName: echo-cert}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true}
`

const vsYAML = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo.example.com]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {prefix: /v1}}]
    route: [{destination: {host: echo, subset: v1}}]
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: echo, subset: v2}}]
`

const drYAML = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
`

func decode[T any](t *testing.T, y string) *T {
	t.Helper()
	v := new(T)
	if err := yaml.Unmarshal([]byte(y), v); err != nil {
		t.Fatal(err)
	}
	return v
}

func selfSigned(t *testing.T, name string) ([]byte, []byte, *x509.CertPool) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	kd, _ := x509.MarshalECPrivateKey(k)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), pool
}

// backend is an h2c-capable echo server naming its version; /trailer answers with a
// gRPC-style trailer.
func backend(t *testing.T, version string) netip.AddrPort {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/trailer" || r.URL.Path == "/v2/trailer" {
			w.Header().Set("Trailer", "Grpc-Status")
			io.WriteString(w, "body")
			w.Header().Set("Grpc-Status", "0")
			return
		}
		fmt.Fprintf(w, "%s %s proto=%d host=%s", version, r.URL.Path, r.ProtoMajor, r.Host)
	})
	s := httptest.NewUnstartedServer(h2c.NewHandler(h, &http2.Server{}))
	s.Start()
	t.Cleanup(s.Close)
	return netip.MustParseAddrPort(s.Listener.Addr().String())
}

type harness struct {
	p       *proxy.Proxy
	reg     *prometheus.Registry
	snaps   cache.SnapshotCache
	mu      sync.Mutex
	addrs   map[uint16]string
	nacks   chan string
	roots   *x509.CertPool
	view    func(extra ...string) *primary.View
	version int
}

var nodeLabels, _ = structpb.NewStruct(map[string]any{"NETWORK": "n1", "LABELS": map[string]any{"istio": "ingressgateway"}})
var testNode = &core.Node{Id: "router~127.0.0.1~ingress-0.istio-system~istio-system.svc.cluster.local", Metadata: nodeLabels}

func start(t *testing.T) *harness {
	h := &harness{addrs: map[uint16]string{}, nacks: make(chan string, 16), reg: prometheus.NewRegistry()}
	v1, v2 := backend(t, "v1"), backend(t, "v2")
	cert, key, roots := selfSigned(t, "echo.example.com")
	h.roots = roots
	h.view = func(extra ...string) *primary.View {
		r := primary.NewRegistry()
		k := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
		port := primary.ServicePort{Name: "http", Port: 8080, Protocol: mesh.ProtocolHTTP}
		ep := func(a netip.AddrPort, ver string) mesh.Endpoint {
			return mesh.Endpoint{Address: a.Addr(), Cluster: "c1", Network: "n1", Health: mesh.HealthHealthy,
				Ports: []mesh.Port{{Name: "http", Number: a.Port(), Protocol: mesh.ProtocolHTTP}}, Labels: map[string]string{"version": ver}}
		}
		svc := &primary.Service{Hostname: k.Hostname(""), Key: k, VIP: netip.MustParseAddr("10.96.0.1"), Ports: []primary.ServicePort{port}}
		r.UpdateService(primary.ShardKey{Source: primary.SourceKubernetes, Cluster: "c1"}, svc.Hostname, svc, []mesh.Endpoint{ep(v1, "v1"), ep(v2, "v2")})
		tc := &primary.TrafficConfig{Domain: mesh.DefaultDomain, DestinationRules: []*networkingv1.DestinationRule{decode[networkingv1.DestinationRule](t, drYAML)},
			VirtualServices: []*networkingv1.VirtualService{decode[networkingv1.VirtualService](t, vsYAML)}}
		for _, y := range extra {
			tc.VirtualServices = append(tc.VirtualServices, decode[networkingv1.VirtualService](t, y))
		}
		r.SetTrafficConfig(tc)
		r.SetIngressConfig(&primary.IngressConfig{Gateways: []*networkingv1.Gateway{decode[networkingv1.Gateway](t, gatewayYAML)},
			Credentials: map[string]primary.GatewayCredential{"istio-system/echo-cert": {Namespace: "istio-system", Name: "echo-cert", CertChain: cert, Key: key}}})
		return r.View()
	}
	h.snaps = cache.NewSnapshotCache(true, cache.IDHash{}, nil)
	h.push(t)
	gs := grpc.NewServer()
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, server.NewServer(context.Background(), h.snaps, nil))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	p, err := proxy.New(proxy.Options{Metrics: h.reg, Listen: func(port uint16) (net.Listener, error) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			h.mu.Lock()
			h.addrs[port] = l.Addr().String()
			h.mu.Unlock()
		}
		return l, err
	}})
	if err != nil {
		t.Fatal(err)
	}
	h.p = p
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.Run(ctx, proxy.XDSConfig{Conn: conn, Node: testNode, OnNACK: func(typ string, err error) {
			select { // the test's snapshot cache may answer a NACK with the same version again
			case h.nacks <- typ + ": " + err.Error():
			default:
			}
		}})
	}()
	t.Cleanup(func() { cancel(); <-done; p.Close(); conn.Close() })
	return h
}

// push builds the ingress view as the primary does and serves it to the node.
func (h *harness) push(t *testing.T, extra ...string) {
	t.Helper()
	pr, err := primary.ProxyFromNode(testNode)
	if err != nil {
		t.Fatal(err)
	}
	key := pr.Key()
	res, err := primary.BuildResources(h.view(extra...), key)
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	h.version++
	snap, err := res.Snapshot(strconv.Itoa(h.version))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.snaps.SetSnapshot(context.Background(), testNode.GetId(), snap); err != nil {
		t.Fatal(err)
	}
}

func (h *harness) addr(port uint16) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.addrs[port]
}

// client dials the proxy's port-443 listener whatever the URL says.
func (h *harness) client(h2 bool) *http.Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, a string) (net.Conn, error) {
			_, port, _ := net.SplitHostPort(a)
			n, _ := strconv.Atoi(port)
			return (&net.Dialer{}).DialContext(ctx, "tcp", h.addr(uint16(n)))
		},
		TLSClientConfig:   &tls.Config{RootCAs: h.roots},
		ForceAttemptHTTP2: h2,
	}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 20 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

func get(t *testing.T, c *http.Client, url string, host string) (int, string, http.Header) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if host != "" {
		req.Host = host
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Trailer
}

func waitReady(t *testing.T, h *harness) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	c := h.client(false)
	for time.Now().Before(deadline) {
		if h.addr(443) != "" {
			req, _ := http.NewRequest("GET", "https://echo.example.com/v1", nil)
			if resp, err := c.Do(req); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("the proxy never served https://echo.example.com/v1")
}

func TestIngressEndToEnd(t *testing.T) {
	h := start(t)
	waitReady(t, h)
	for _, h2 := range []bool{false, true} {
		c := h.client(h2)
		for _, v := range []string{"v1", "v2"} {
			code, body, _ := get(t, c, "https://echo.example.com/"+v+"/x", "")
			if code != 200 || !strings.HasPrefix(body, v+" /"+v+"/x") || !strings.Contains(body, "host=echo.example.com") {
				t.Errorf("h2=%v /%s: %d %q", h2, v, code, body)
			}
			if h2 && !strings.Contains(body, "proto=2") {
				t.Errorf("h2 request went upstream as %q", body)
			}
		}
		if code, _, _ := get(t, c, "https://echo.example.com/nope", ""); code != 404 {
			t.Errorf("bad path: %d, want 404", code)
		}
		if code, _, _ := get(t, c, "https://echo.example.com/", "unserved.example.com"); code != 404 {
			t.Errorf("unserved host: %d, want 404", code)
		}
	}
	// gRPC-style trailers pass through over HTTP/2.
	if _, body, tr := get(t, h.client(true), "https://echo.example.com/v1/trailer", ""); body != "body" || tr.Get("Grpc-Status") != "0" {
		t.Errorf("trailers: body %q trailer %v", body, tr)
	}
	// HTTP redirects to HTTPS.
	code, _, _ := get(t, h.client(false), "http://echo.example.com/v1?q=1", "")
	if code != http.StatusMovedPermanently {
		t.Errorf("http: %d, want 301", code)
	}
	// TLS without SNI, and with an unknown name: closed, counted.
	for _, name := range []string{"", "nobody.example.com"} {
		conn, err := tls.Dial("tcp", h.addr(443), &tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err == nil {
			conn.Close()
			t.Errorf("TLS with SNI %q was accepted", name)
		}
	}
	if n := testutil.ToFloat64(refused(h, proxy.RefuseNoSNI)); n < 1 {
		t.Errorf("no_sni refusals: %v", n)
	}
	if n := testutil.ToFloat64(refused(h, proxy.RefuseUnknownSNI)); n < 1 {
		t.Errorf("unknown_sni refusals: %v", n)
	}
	// Oversized headers: 431.
	req, _ := http.NewRequest("GET", "https://echo.example.com/v1", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 70<<10))
	big := h.client(false)
	if resp, err := big.Do(req); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("oversized headers: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	big.CloseIdleConnections()
	// Malformed HTTP: 400 and the connection closed.
	conn, err := net.Dial("tcp", h.addr(80))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(conn, "GARBAGE\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	b, _ := io.ReadAll(conn)
	conn.Close()
	if !strings.HasPrefix(string(b), "HTTP/1.1 400") {
		t.Errorf("malformed request answered %q", b)
	}
	if n := testutil.ToFloat64(requests(h, "0.0.0.0_443", "404")); n < 4 {
		t.Errorf("404s counted: %v", n)
	}
	// The oversized headers and the malformed request were answered by net/http without
	// a handler; both are counted when their connections close.
	waitCounter(t, func() prometheus.Collector { return refused(h, proxy.RefuseBadHTTP) }, 2)
}

// waitCounter waits up to 10 s for the counter c reads to reach at least want.
func waitCounter(t *testing.T, c func() prometheus.Collector, want float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for testutil.ToFloat64(c()) < want {
		if time.Now().After(deadline) {
			t.Fatalf("counter %v, want ≥ %v", testutil.ToFloat64(c()), want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestNACK: a route with fault injection, which the proxy does not implement, is refused
// with the field named, and the previous routes keep serving.
func TestNACK(t *testing.T) {
	h := start(t)
	waitReady(t, h)
	h.push(t, `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: faulty, namespace: demo}
spec:
  hosts: [other.example.com]
  gateways: [istio-system/ingress]
  http:
  - fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
    route: [{destination: {host: echo, subset: v1}}]
`)
	select {
	case n := <-h.nacks:
		if !strings.Contains(n, "typed_per_filter_config") {
			t.Errorf("NACK reason %q", n)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no NACK")
	}
	if code, body, _ := get(t, h.client(false), "https://echo.example.com/v1", ""); code != 200 || !strings.HasPrefix(body, "v1") {
		t.Errorf("after the NACK: %d %q", code, body)
	}
}

func refused(h *harness, reason string) prometheus.Collector {
	return counter(h, "isthmus_proxy_refused_total", map[string]string{"reason": reason})
}

func requests(h *harness, l, code string) prometheus.Collector {
	return counter(h, "isthmus_proxy_requests_total", map[string]string{"listener": l, "code": code})
}

// counter reads one labelled counter from the harness registry.
func counter(h *harness, name string, labels map[string]string) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
	mfs, _ := h.reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue next
				}
			}
			g.Set(m.GetCounter().GetValue())
		}
	}
	return g
}
