package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

const typeCluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

// adsCall opens an ADS stream to addr with the given TLS client certificate (nil: none)
// and metadata, sends one wildcard CDS request for node, and returns the first response
// or the stream's error.
func adsCall(t *testing.T, addr string, roots *x509.CertPool, cert *tls.Certificate, md metadata.MD, node *core.Node) (*discovery.DiscoveryResponse, error) {
	t.Helper()
	tc := &tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if md != nil {
		ctx = metadata.NewOutgoingContext(ctx, md)
	}
	s, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: typeCluster}); err != nil {
		return nil, err
	}
	return s.Recv()
}

func xdsNode(id string, meta map[string]any) *core.Node {
	s, _ := structpb.NewStruct(meta)
	return &core.Node{Id: id, Metadata: s}
}

// saToken asks cluster for a token of ns/sa with the CA's audience.
func saToken(t *testing.T, c kubernetes.Interface, ns, sa string) string {
	t.Helper()
	tr, err := c.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// expiredToken signs, with the cluster's own service-account key, a token for ns/sa that
// expired a minute ago: a real token of that cluster, refused only for its age.
func expiredToken(t *testing.T, clusterDir string, c kubernetes.Interface, ns, sa string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(clusterDir, "pki", "sa.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(raw)
	var key *ecdsa.PrivateKey
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		key = k
	} else if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		key = k.(*ecdsa.PrivateKey)
	} else {
		t.Fatalf("sa.key: %v", err)
	}
	acct, err := c.CoreV1().ServiceAccounts(ns).Get(context.Background(), sa, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims := map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local", "sub": "system:serviceaccount:" + ns + ":" + sa,
		"aud": []string{trust.Audience}, "iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(),
		"exp":           now.Add(-time.Minute).Unix(),
		"kubernetes.io": map[string]any{"namespace": ns, "serviceaccount": map[string]any{"name": sa, "uid": string(acct.UID)}},
	}
	enc := func(v any) string { b, _ := json.Marshal(v); return base64.RawURLEncoding.EncodeToString(b) }
	signing := enc(map[string]string{"alg": "ES256", "typ": "JWT"}) + "." + enc(claims)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// leafFor issues a client certificate for id from ca, as the CA would.
func leafFor(t testing.TB, ca *trust.Authority, id mesh.Identity) *tls.Certificate {
	t.Helper()
	return leafForTTL(t, ca, id, time.Hour)
}

// leafForTTL is leafFor with a validity of ttl.
func leafForTTL(t testing.TB, ca *trust.Authority, id mesh.Identity, ttl time.Duration) *tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	csr, _ := x509.ParseCertificateRequest(der)
	chain, err := ca.Sign(context.Background(), csr, id, ttl)
	if err != nil {
		t.Fatal(err)
	}
	var tc tls.Certificate
	for _, c := range chain[:len(chain)-1] {
		b, _ := pem.Decode([]byte(c))
		tc.Certificate = append(tc.Certificate, b.Bytes)
	}
	tc.PrivateKey = key
	return &tc
}

// TestSecureXDS runs `isthmus primary` against two real clusters (west, its own; east,
// linked by a remote secret) with no plaintext port, and checks who its secure xDS port
// serves and whom it refuses, with which code, and that each refusal is counted.
func TestSecureXDS(t *testing.T) {
	clusters := kubetest.Start(t, 2)
	bin := buildIsthmus(t)
	ctx := context.Background()
	west, _ := clusters[0].Client()
	east, _ := clusters[1].Client()
	for c, network := range map[kubernetes.Interface]string{west: "net-west", east: "net-east"} {
		for _, ns := range []*corev1.Namespace{
			{ObjectMeta: metav1.ObjectMeta{Name: "istio-system", Labels: map[string]string{primary.LabelNetwork: network}}},
			{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}, {ObjectMeta: metav1.ObjectMeta{Name: "other"}},
		} {
			if _, err := c.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		for _, sa := range [][2]string{{"demo", "echo"}, {"other", "x"}, {"istio-system", "istio-eastwestgateway"}} {
			if _, err := c.CoreV1().ServiceAccounts(sa[0]).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa[1]}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	stdout, stderr, err := run(t, bin, "remote-secret", "create", "--kubeconfig", clusters[1].Kubeconfig, "--name", "east")
	if err != nil {
		t.Fatalf("remote-secret create: %v\n%s", err, stderr)
	}
	var secret corev1.Secret
	if err := yaml.Unmarshal([]byte(stdout), &secret); err != nil {
		t.Fatal(err)
	}
	if _, err := west.CoreV1().Secrets("istio-system").Create(ctx, &secret, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A pod of demo/echo in west, for the certificate caller (a certificate names no
	// cluster; its pod in the claimed cluster vouches for it).
	if _, err := west.CoreV1().Pods("demo").Create(ctx, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "echo-1"},
		Spec: corev1.PodSpec{ServiceAccountName: "echo", Containers: []corev1.Container{{Name: "c", Image: "none"}}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	root, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: "west"})
	if err != nil {
		t.Fatal(err)
	}
	caDir := filepath.Join(t.TempDir(), "ca")
	if err := inter.WriteDir(caDir); err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root.Cert)

	httpAddr, caAddr := freeAddr(t), freeAddr(t)
	logPath := filepath.Join(t.TempDir(), "primary.log")
	logf, _ := os.Create(logPath)
	p := exec.Command(bin, "primary", "--kubeconfig", clusters[0].Kubeconfig, "--cluster-id", "west",
		"--http-address", httpAddr, "--probe-interval", "1s", "--ca-dir", caDir, "--ca-address", caAddr)
	p.Stdout, p.Stderr = logf, logf
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		p.Process.Signal(syscall.SIGTERM)
		p.Wait()
		if t.Failed() {
			log, _ := os.ReadFile(logPath)
			t.Logf("primary log:\n%s", log)
		}
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get("http://" + httpAddr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("primary not ready: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}

	bearer := func(tok, cluster string) metadata.MD {
		md := metadata.Pairs("authorization", "Bearer "+tok)
		if cluster != "" {
			md.Set("clusterid", cluster)
		}
		return md
	}
	echoWest := saToken(t, west, "demo", "echo")
	echoEast := saToken(t, east, "demo", "echo")
	gwWest := saToken(t, west, "istio-system", "istio-eastwestgateway")
	sidecar := func(ns, cluster, network string) *core.Node {
		return xdsNode("sidecar~10.10.0.10~echo-1."+ns+"~"+ns+".svc.cluster.local",
			map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": cluster, "NETWORK": network})
	}
	foreignRoot, _ := trust.NewRoot("foreign.example", trust.RootOptions{})
	foreignInter, _ := foreignRoot.NewIntermediate(trust.IntermediateOptions{Cluster: "west"})
	foreignCert := leafFor(t, foreignInter, mesh.Identity{TrustDomain: "foreign.example", Namespace: "demo", ServiceAccount: "echo"})
	echoCert := leafFor(t, inter, mesh.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"})
	otherCert := leafFor(t, inter, mesh.Identity{TrustDomain: "cluster.local", Namespace: "other", ServiceAccount: "x"})
	// Expired at once (a millisecond's validity, NotAfter kept to the second).
	expiredCert := leafForTTL(t, inter, mesh.Identity{TrustDomain: "cluster.local", Namespace: "demo", ServiceAccount: "echo"}, time.Millisecond)

	// The node agent gives the pod its address; a certificate caller must be at it.
	var podIP string
	for deadline := time.Now().Add(30 * time.Second); podIP == ""; time.Sleep(100 * time.Millisecond) {
		pod, err := west.CoreV1().Pods("demo").Get(ctx, "echo-1", metav1.GetOptions{})
		if err == nil {
			podIP = pod.Status.PodIP
		}
		if time.Now().After(deadline) {
			t.Fatalf("pod demo/echo-1 has no address: %v", err)
		}
	}
	atPod := xdsNode("sidecar~"+podIP+"~echo-1.demo~demo.svc.cluster.local", map[string]any{"GENERATOR": "grpc", "CLUSTER_ID": "west", "NETWORK": "net-west"})

	for _, tc := range []struct {
		name string
		cert *tls.Certificate
		md   metadata.MD
		node *core.Node
		code codes.Code // OK: a response
	}{
		{"token of west", nil, bearer(echoWest, "west"), sidecar("demo", "west", "net-west"), codes.OK},
		{"token of east through the link", nil, bearer(echoEast, "east"), sidecar("demo", "east", "net-east"), codes.OK},
		{"certificate with its pod", echoCert, nil, atPod, codes.OK},
		{"certificate at another address than its pod", echoCert, nil, sidecar("demo", "west", "net-west"), codes.PermissionDenied},
		{"gateway token", nil, bearer(gwWest, "west"), xdsNode("router~0.0.0.0~eastwest-net-west~istio-system.svc.cluster.local",
			map[string]any{"CLUSTER_ID": "west", "NETWORK": "net-west"}), codes.OK},
		{"no credentials", nil, nil, sidecar("demo", "west", "net-west"), codes.Unauthenticated},
		{"expired token", nil, bearer(expiredToken(t, clusters[0].Dir, west, "demo", "echo"), "west"), sidecar("demo", "west", "net-west"), codes.Unauthenticated},
		{"token of an unknown cluster", nil, bearer(echoWest, "nowhere"), sidecar("demo", "nowhere", "net-west"), codes.Unauthenticated},
		{"token of east claiming west", nil, bearer(echoEast, "west"), sidecar("demo", "west", "net-west"), codes.Unauthenticated},
		{"token for demo asking for other", nil, bearer(echoWest, "west"), sidecar("other", "west", "net-west"), codes.PermissionDenied},
		{"node claiming another network", nil, bearer(echoWest, "west"), sidecar("demo", "west", "net-east"), codes.PermissionDenied},
		{"node claiming no network", nil, bearer(echoWest, "west"), sidecar("demo", "west", ""), codes.PermissionDenied},
		// A presented certificate that does not verify fails the TLS handshake (the
		// client connects again with the certificate it holds then), before any stream.
		{"certificate of a foreign trust domain", foreignCert, nil, sidecar("demo", "west", "net-west"), codes.Unavailable},
		{"expired certificate of its pod", expiredCert, nil, atPod, codes.Unavailable},
		{"certificate without a pod in the cluster", otherCert, nil, sidecar("other", "west", "net-west"), codes.PermissionDenied},
		{"certificate claiming another cluster", echoCert, nil, sidecar("demo", "east", "net-east"), codes.PermissionDenied},
		{"router outside the system namespace", nil, bearer(echoWest, "west"), xdsNode("router~0.0.0.0~gw.demo~demo.svc.cluster.local",
			map[string]any{"CLUSTER_ID": "west", "NETWORK": "net-west"}), codes.PermissionDenied},
		{"malformed node", nil, bearer(echoWest, "west"), xdsNode("echo-1", nil), codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := adsCall(t, caAddr, roots, tc.cert, tc.md, tc.node)
			if tc.code == codes.OK {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if resp.GetTypeUrl() != typeCluster {
					t.Fatalf("response %v", resp)
				}
				return
			}
			if status.Code(err) != tc.code {
				t.Fatalf("got %v (%v), want code %v", status.Code(err), err, tc.code)
			}
			if resp != nil {
				t.Fatalf("a refused stream got a response: %v", resp)
			}
		})
	}

	// A raw ADS client that does not even speak TLS gets nothing.
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	s, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(rctx)
	if err == nil {
		if err = s.Send(&discovery.DiscoveryRequest{Node: sidecar("demo", "west", "net-west"), TypeUrl: typeCluster}); err == nil {
			_, err = s.Recv()
		}
	}
	cancel()
	conn.Close()
	if err == nil {
		t.Fatal("a plaintext client got a response from the secure port")
	}

	// A connected proxy shows in `isthmus status` with what it authenticated as.
	{
		tc := &tls.Config{RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*echoCert}}
		conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
		if err != nil {
			t.Fatal(err)
		}
		sctx, cancel := context.WithCancel(ctx)
		s, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
		if err == nil {
			err = s.Send(&discovery.DiscoveryRequest{Node: atPod, TypeUrl: typeCluster})
		}
		if err == nil {
			_, err = s.Recv()
		}
		if err != nil {
			t.Fatal(err)
		}
		stdout, stderr, err := run(t, bin, "status", "--primary", httpAddr)
		want := []string{"sidecar~" + podIP + "~echo-1.demo~demo.svc.cluster.local", "grpc", "spiffe://cluster.local/ns/demo/sa/echo", "certificate", "west", "net-west", "direct"}
		found := false
		for _, line := range strings.Split(stdout, "\n") {
			if f := strings.Fields(line); len(f) == 8 && strings.Join(f[:7], " ") == strings.Join(want, " ") {
				found = true
			}
		}
		if err != nil || !found {
			t.Errorf("status: %v\n%s%s\nwant a line with %q", err, stdout, stderr, want)
		}
		cancel()
		conn.Close()
	}

	// Every refusal is counted by reason.
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, reason := range []string{"unauthenticated", "unknown_cluster", "namespace", "network", "pod", "gateway", "bad_node"} {
		if !strings.Contains(string(body), fmt.Sprintf(`isthmus_primary_xds_auth_refused_total{reason=%q}`, reason)) {
			t.Errorf("no refusal counted for %s", reason)
		}
	}
	if !strings.Contains(string(body), `isthmus_trust_client_certificates_refused_total 2`) {
		t.Errorf("client certificates refused at the handshake not counted:\n%s", metricLines(string(body), "isthmus_trust_client"))
	}
	if !strings.Contains(string(body), `isthmus_primary_xds_authenticated_total{method="certificate"} 2`) {
		t.Errorf("certificate authentications not counted:\n%s", metricLines(string(body), "isthmus_primary_xds"))
	}
}

func metricLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
