package primary_test

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
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

const (
	guardedHost = "guarded.authz.svc.cluster.local"
	plainHost   = "plain.authz.svc.cluster.local"
	authzPort   = 9443
)

// Policies under test, as a user writes them: only alice may call the guarded server;
// then only bob (an update of the same object); a policy with an unsupported field, which
// is refused alone; and STRICT mTLS for the namespace.
const (
	allowAlice = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: guarded, namespace: authz}
spec:
  selector: {matchLabels: {app: guarded}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/authz/sa/alice]}
    to:
    - operation: {paths: ["/grpc.testing.TestService/*"]}
`
	badPolicy = `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-address, namespace: authz}
spec:
  selector: {matchLabels: {app: guarded}}
  rules:
  - from:
    - source: {ipBlocks: [10.99.0.0/16]}
`
	strictAuthz = `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: authz}
spec:
  mtls: {mode: STRICT}
`
)

// testCA issues workload certificates for SPIFFE IDs of trust domain cluster.local.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "authz test root"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		URIs: []*url.URL{{Scheme: "spiffe", Host: "cluster.local"}}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes cert.pem, key.pem and root.pem for spiffe://cluster.local/ns/authz/sa/<sa>
// into a new directory, and returns it with the key pair.
func (ca *testCA) issue(t *testing.T, sa string) (string, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := url.Parse("spiffe://cluster.local/ns/authz/sa/" + sa)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, URIs: []*url.URL{id}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})
	dir := t.TempDir()
	for name, b := range map[string][]byte{"cert.pem": certPEM, "key.pem": keyPEM, "root.pem": ca.pem} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	kp, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return dir, kp
}

// xdsBootstrap is a proxyless bootstrap for node id with the file_watcher certificate
// provider over dir, and the server listener template an xDS-enabled server needs.
func xdsBootstrap(id, dir string) []byte {
	return fmt.Appendf(nil, `{
	  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
	  "node": {"id": %q, "metadata": {"GENERATOR": "grpc", "CLUSTER_ID": %q}},
	  "server_listener_resource_name_template": %q,
	  "certificate_providers": {%q: {"plugin_name": "file_watcher", "config": {
	    "certificate_file": %q, "private_key_file": %q, "ca_certificate_file": %q, "refresh_interval": "1s"}}}
	}`, env.xdsAddr, id, env.clusters[0].Name, primary.InboundListenerTemplate, mesh.CertProviderInstance,
		filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem"), filepath.Join(dir, "root.pem"))
}

// identityServer answers with its name and the caller's SPIFFE ID.
type identityServer struct {
	testgrpc.UnimplementedTestServiceServer
	name string
}

func (s *identityServer) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	caller := ""
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 && len(ti.State.PeerCertificates[0].URIs) > 0 {
			caller = ti.State.PeerCertificates[0].URIs[0].String()
		}
	}
	return &testgrpc.SimpleResponse{ServerId: s.name, Username: caller}, nil
}

// addXDSServerPod starts a real xds.NewGRPCServer on ip:authzPort in the pods' network and
// registers its Pod (service account sa, the given labels plus the xDS-server opt-in).
func addXDSServerPod(t *testing.T, ca *testCA, name, ip, sa string, labels map[string]string) {
	t.Helper()
	if err := env.pods.AddAddr(netip.MustParseAddr(ip)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(ip, fmt.Sprint(authzPort)))
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := ca.issue(t, sa)
	creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := xds.NewGRPCServer(grpc.Creds(creds),
		xds.BootstrapContentsForTesting(xdsBootstrap(fmt.Sprintf("sidecar~%s~%s.authz~authz.svc.cluster.local", ip, name), dir)))
	if err != nil {
		t.Fatal(err)
	}
	testgrpc.RegisterTestServiceServer(s, &identityServer{name: name})
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	labels[primary.LabelXDSServer] = "true"
	_, err = env.clients[0].CoreV1().Pods("authz").Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "authz", Labels: labels, Annotations: map[string]string{kubelocal.PodIPAnnotation: ip}},
		Spec: corev1.PodSpec{ServiceAccountName: sa, Containers: []corev1.Container{{Name: "server", Image: "server",
			Ports: []corev1.ContainerPort{{Name: "grpc", ContainerPort: authzPort}}}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

// proxylessCaller dials host through the primary with grpc-go's xDS client, presenting the
// certificate of service account sa (mTLS from the xDS security configuration).
func proxylessCaller(t *testing.T, ca *testCA, sa, host string) testgrpc.TestServiceClient {
	t.Helper()
	dir, _ := ca.issue(t, sa)
	rb, err := xds.NewXDSResolverWithConfigForTesting(xdsBootstrap(fmt.Sprintf("sidecar~127.0.0.1~%s-%d.authz~authz.svc.cluster.local", sa, time.Now().UnixNano()), dir))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:%d", host, authzPort), grpc.WithTransportCredentials(creds), grpc.WithResolvers(rb), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// directCaller dials addr without xDS: plaintext when cert is nil, else mTLS with cert
// (verifying the server against the root only: workload certificates carry no DNS name).
func directCaller(t *testing.T, addr string, ca *testCA, cert *tls.Certificate) testgrpc.TestServiceClient {
	t.Helper()
	creds := insecure.NewCredentials()
	if cert != nil {
		pool := x509.NewCertPool()
		pool.AddCert(ca.cert)
		creds = credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{*cert}, InsecureSkipVerify: true,
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				leaf, err := x509.ParseCertificate(raw[0])
				if err != nil {
					return err
				}
				_, err = leaf.Verify(x509.VerifyOptions{Roots: pool})
				return err
			}})
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(creds), grpc.WithContextDialer(env.pods.Dial))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return testgrpc.NewTestServiceClient(conn)
}

// call makes one call and returns the caller identity the server saw, or the status code.
func call(c testgrpc.TestServiceClient) (string, codes.Code) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{})
	if err != nil {
		return "", status.Code(err)
	}
	return r.GetUsername(), codes.OK
}

// expect polls until every caller's next calls give want (the code, and for OK the
// identity the server saw), then checks 20 more calls each all do.
func expect(t *testing.T, what string, want map[string]codes.Code, callers map[string]testgrpc.TestServiceClient, ids map[string]string) {
	t.Helper()
	check := func(n int) error {
		for name, code := range want {
			for range n {
				id, got := call(callers[name])
				if got != code || (code == codes.OK && id != ids[name]) {
					return fmt.Errorf("%s: %v (caller %q); want %v", name, got, id, code)
				}
			}
		}
		return nil
	}
	kubetest.Eventually(t, 30*time.Second, what, func() error { return check(1) })
	if err := check(20); err != nil {
		t.Fatalf("%s, after it first held: %v", what, err)
	}
}

func applySecurity(t *testing.T, doc string) {
	t.Helper()
	ctx := context.Background()
	meta := struct {
		Kind string `json:"kind"`
	}{}
	if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
		t.Fatal(err)
	}
	sec := env.istio.SecurityV1()
	switch meta.Kind {
	case primary.KindAuthorizationPolicy:
		ap := &securityv1.AuthorizationPolicy{}
		if err := yaml.Unmarshal([]byte(doc), ap); err != nil {
			t.Fatal(err)
		}
		cur, err := sec.AuthorizationPolicies(ap.Namespace).Get(ctx, ap.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = sec.AuthorizationPolicies(ap.Namespace).Create(ctx, ap, metav1.CreateOptions{})
		} else if err == nil {
			ap.ResourceVersion = cur.ResourceVersion
			_, err = sec.AuthorizationPolicies(ap.Namespace).Update(ctx, ap, metav1.UpdateOptions{})
		}
		if err != nil {
			t.Fatal(err)
		}
	case primary.KindPeerAuthentication:
		pa := &securityv1.PeerAuthentication{}
		if err := yaml.Unmarshal([]byte(doc), pa); err != nil {
			t.Fatal(err)
		}
		if _, err := sec.PeerAuthentications(pa.Namespace).Create(ctx, pa, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("kind %q", meta.Kind)
	}
}

// TestAuthorizationAndPeerAuthentication runs real xDS-enabled grpc-go servers
// (xds.NewGRPCServer) whose inbound Listeners come from the primary, and real grpc-go
// clients with two identities, alice and bob. Through the API server: an
// AuthorizationPolicy allows alice and denies bob; updated in place, it allows bob and
// denies alice; a policy with an unsupported field is refused alone (configz, Event),
// changing nothing; a plaintext caller reaches the plain server until a STRICT
// PeerAuthentication makes it refuse plaintext while an mTLS caller still gets through.
// Every change applies to the running servers.
func TestAuthorizationAndPeerAuthentication(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "authz"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	for _, sa := range []string{"server"} {
		if _, err := cs.CoreV1().ServiceAccounts("authz").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	for name, app := range map[string]string{"guarded": "guarded", "plain": "plain"} {
		if _, err := cs.CoreV1().Services("authz").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "authz"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app},
				Ports: []corev1.ServicePort{{Name: "grpc", Port: authzPort, TargetPort: intstr.FromString("grpc")}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t)
	addXDSServerPod(t, ca, "guarded-0", "10.99.40.1", "server", map[string]string{"app": "guarded", primary.LabelTLSMode: primary.TLSModeIstio})
	addXDSServerPod(t, ca, "plain-0", "10.99.40.2", "server", map[string]string{"app": "plain"})

	alice := proxylessCaller(t, ca, "alice", guardedHost)
	bob := proxylessCaller(t, ca, "bob", guardedHost)
	callers := map[string]testgrpc.TestServiceClient{"alice": alice, "bob": bob}
	ids := map[string]string{"alice": "spiffe://cluster.local/ns/authz/sa/alice", "bob": "spiffe://cluster.local/ns/authz/sa/bob"}

	expect(t, "no policy: both callers served over mTLS", map[string]codes.Code{"alice": codes.OK, "bob": codes.OK}, callers, ids)

	t.Run("allow alice, deny bob", func(t *testing.T) {
		applySecurity(t, allowAlice)
		expect(t, "alice allowed, bob denied", map[string]codes.Code{"alice": codes.OK, "bob": codes.PermissionDenied}, callers, ids)
	})
	t.Run("updated in place: allow bob, deny alice", func(t *testing.T) {
		applySecurity(t, strings.Replace(allowAlice, "sa/alice", "sa/bob", 1))
		expect(t, "bob allowed, alice denied", map[string]codes.Code{"alice": codes.PermissionDenied, "bob": codes.OK}, callers, ids)
	})
	t.Run("a refused policy changes nothing and is reported", func(t *testing.T) {
		applySecurity(t, badPolicy)
		kubetest.Eventually(t, 20*time.Second, "configz: by-address refused as unsupported", func() error {
			for _, o := range configz(t).Objects {
				if o.Kind == primary.KindAuthorizationPolicy && o.Name == "by-address" {
					if !o.Applied && o.Reason == primary.ReasonUnsupported && strings.Contains(o.Message, "rules[0].from[0].source.ipBlocks") {
						return nil
					}
					return fmt.Errorf("status %+v", o)
				}
			}
			return fmt.Errorf("by-address not on configz")
		})
		expect(t, "still bob allowed, alice denied", map[string]codes.Code{"alice": codes.PermissionDenied, "bob": codes.OK}, callers, ids)
		kubetest.Eventually(t, 10*time.Second, "a Warning event on by-address", func() error {
			evs, err := cs.CoreV1().Events("authz").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=by-address"})
			if err != nil {
				return err
			}
			for _, e := range evs.Items {
				if e.Type == corev1.EventTypeWarning && e.Reason == primary.EventReasonRejected && e.InvolvedObject.Kind == primary.KindAuthorizationPolicy &&
					e.InvolvedObject.APIVersion == "security.istio.io/v1" && strings.HasPrefix(e.Message, primary.ReasonUnsupported+": ") {
					return nil
				}
			}
			return fmt.Errorf("events: %+v", evs.Items)
		})
		resp, err := http.Get(env.debug.URL + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), `isthmus_primary_config_rejected_total{kind="AuthorizationPolicy",reason="unsupported"} 1`) {
			t.Fatalf("the refusal is not counted:\n%s", body)
		}
	})
	t.Run("STRICT refuses a plaintext caller", func(t *testing.T) {
		addr := net.JoinHostPort("10.99.40.2", fmt.Sprint(authzPort))
		_, aliceCert := ca.issue(t, "alice")
		plaintext := map[string]testgrpc.TestServiceClient{"plaintext": directCaller(t, addr, ca, nil)}
		expect(t, "PERMISSIVE (no PeerAuthentication): the plain server takes plaintext", map[string]codes.Code{"plaintext": codes.OK}, plaintext, map[string]string{"plaintext": ""})
		applySecurity(t, strictAuthz)
		expect(t, "STRICT: plaintext refused", map[string]codes.Code{"plaintext": codes.Unavailable}, plaintext, nil)
		mtls := map[string]testgrpc.TestServiceClient{"mtls": directCaller(t, addr, ca, &aliceCert)}
		expect(t, "STRICT: an mTLS caller is served", map[string]codes.Code{"mtls": codes.OK}, mtls, map[string]string{"mtls": ids["alice"]})
	})
}
