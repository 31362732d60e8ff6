package primary_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// TestFederationRefusesPeersNotExportedTo runs real xDS-enabled grpc-go servers whose
// inbound Listeners come from the primary of mesh-a, which has two live peers, mesh-b
// (b.example) and mesh-c (c.example), and exports fedshared to mesh-b only. Real mTLS
// callers with certificates of the three trust domains call the servers directly (as a
// peer's client arrives through the gateway's passthrough): fedshared serves mesh-a's own
// caller and mesh-b's, and refuses mesh-c's with PermissionDenied by the trust domain its
// certificate proves; fedprivate (exported to nobody) refuses both peers. Exporting
// fedshared to mesh-c too lets mesh-c's caller in; with no live peers nothing is refused.
func TestFederationRefusesPeersNotExportedTo(t *testing.T) {
	needEnv(t)
	ctx := context.Background()
	if err := istiocrd.Apply(ctx, env.clusters[0].RESTConfig()); err != nil {
		t.Fatal(err)
	}
	cs := env.clients[0]
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "authz"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts("authz").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "server"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	for _, name := range []string{"fedshared", "fedprivate"} {
		if _, err := cs.CoreV1().Services("authz").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "authz"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name},
				Ports: []corev1.ServicePort{{Name: "grpc", Port: authzPort, TargetPort: intstr.FromString("grpc")}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ca := newTestCA(t)
	const sharedIP, privateIP = "10.99.41.1", "10.99.41.2"
	addXDSServerPod(t, ca, "fedshared-0", sharedIP, "server", map[string]string{"app": "fedshared", primary.LabelTLSMode: primary.TLSModeIstio})
	addXDSServerPod(t, ca, "fedprivate-0", privateIP, "server", map[string]string{"app": "fedprivate", primary.LabelTLSMode: primary.TLSModeIstio})

	ids := map[string]string{
		"own":    "spiffe://cluster.local/ns/clients/sa/client",
		"mesh-b": "spiffe://b.example/ns/clients/sa/client",
		"mesh-c": "spiffe://c.example/ns/clients/sa/client",
	}
	callers := map[string]map[string]testgrpc.TestServiceClient{"shared": {}, "private": {}}
	for who, id := range ids {
		cert := issueSPIFFE(t, ca, id)
		callers["shared"][who] = directCaller(t, net.JoinHostPort(sharedIP, strconv.Itoa(authzPort)), ca, &cert)
		callers["private"][who] = directCaller(t, net.JoinHostPort(privateIP, strconv.Itoa(authzPort)), ca, &cert)
	}
	ok, denied := codes.OK, codes.PermissionDenied
	expect(t, "no peers: every caller served", map[string]codes.Code{"own": ok, "mesh-b": ok, "mesh-c": ok}, callers["shared"], ids)

	shared := mesh.ServiceKey{Namespace: "authz", Name: "fedshared"}
	peers := map[mesh.MeshID]mesh.TrustDomain{"mesh-b": "b.example", "mesh-c": "c.example"}
	reg := env.primary.Registry()
	start := time.Now()
	reg.SetFederationExports(primary.FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{shared: {authzPort}},
		Consumers: map[mesh.ServiceKey][]mesh.MeshID{shared: {"mesh-b"}}, Peers: peers})
	expect(t, "fedshared exported to mesh-b only: mesh-c refused", map[string]codes.Code{"own": ok, "mesh-b": ok, "mesh-c": denied}, callers["shared"], ids)
	t.Logf("export set → mesh-c refused at the running server: %s", time.Since(start).Round(time.Millisecond))
	expect(t, "fedprivate exported to nobody: both peers refused", map[string]codes.Code{"own": ok, "mesh-b": denied, "mesh-c": denied}, callers["private"], ids)

	reg.SetFederationExports(primary.FederationExports{Mesh: "mesh-a", Services: map[mesh.ServiceKey][]uint16{shared: {authzPort}},
		Consumers: map[mesh.ServiceKey][]mesh.MeshID{shared: {"mesh-b", "mesh-c"}}, Peers: peers})
	expect(t, "fedshared exported to mesh-c too", map[string]codes.Code{"own": ok, "mesh-b": ok, "mesh-c": ok}, callers["shared"], ids)

	reg.SetFederationExports(primary.FederationExports{})
	expect(t, "no live peers: nothing refused", map[string]codes.Code{"own": ok, "mesh-b": ok, "mesh-c": ok}, callers["private"], ids)
}

// issueSPIFFE issues a client certificate with SPIFFE ID id from ca. The test CA does not
// constrain names, so it stands for each peer's own CA here: what the server judges is
// the trust domain of the ID the verified certificate carries.
func issueSPIFFE(t *testing.T, ca *testCA, id string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, URIs: []*url.URL{u}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	kp, err := tls.X509KeyPair(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}))
	if err != nil {
		t.Fatal(err)
	}
	return kp
}
