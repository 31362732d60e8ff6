package primary

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/types/known/structpb"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/client-go/kubernetes/fake"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// The ingress the scenario builds, as objects: echo.example.com on HTTPS with a
// certificate from the Secret echo-cert and on HTTP redirecting to it; /v1 to subset v1
// (cluster c1's pods on n1), /v2 to subset v2 (c2's pods on n2, through n2's gateway);
// pass.example.com passed through on 8443 by SNI.
const (
	ingressGateway = `
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-system, resourceVersion: "3"}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [echo.example.com]
    tls: {mode: SIMPLE, credentialName: echo-cert}
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 8443, name: tls, protocol: TLS}
    hosts: [pass.example.com]
    tls: {mode: PASSTHROUGH}
`
	ingressVS = `
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo, resourceVersion: "4"}
spec:
  hosts: [echo.example.com]
  gateways: [istio-system/ingress]
  http:
  - match: [{uri: {prefix: /v1}}]
    route: [{destination: {host: echo, subset: v1}}]
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: echo, subset: v2}}]
  tls:
  - match: [{sniHosts: [pass.example.com]}]
    route: [{destination: {host: echo, port: {number: 8080}}}]
`
	ingressDR = `
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo, resourceVersion: "5"}
spec:
  host: echo
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
`
)

func mustGateway(t testing.TB, y string) *networkingv1.Gateway {
	t.Helper()
	g := &networkingv1.Gateway{}
	if err := yaml.Unmarshal([]byte(y), g); err != nil {
		t.Fatal(err)
	}
	return g
}

// testCredential is a self-signed certificate for names, PEM.
func testCredential(t testing.TB, names ...string) (cert, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kd, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd})
}

// ingressView is echo (8080, HTTP) with v1 on c1/n1 and v2 on c2/n2, the objects above,
// and the Secret echo-cert in istio-system.
func ingressView(t testing.TB, gws, vss []string) (*View, GatewayCredential) {
	t.Helper()
	r := NewRegistry()
	echo := mesh.ServiceKey{Namespace: "demo", Name: "echo"}
	port := ServicePort{Name: "http", Port: 8080, Protocol: mesh.ProtocolHTTP}
	e := func(addr string, c mesh.ClusterID, n mesh.NetworkID, version string) mesh.Endpoint {
		return mesh.Endpoint{Address: netip.MustParseAddr(addr), Cluster: c, Network: n, MTLSReady: true, Health: mesh.HealthHealthy,
			Ports: []mesh.Port{{Name: "http", Number: 8080, Protocol: mesh.ProtocolHTTP}}, Locality: mesh.Locality{Region: "r", Zone: string(c)},
			Labels: map[string]string{"app": "echo", "version": version}}
	}
	svc := &Service{Hostname: echo.Hostname(""), Key: echo, VIP: netip.MustParseAddr("10.96.2.1"), Ports: []ServicePort{port}}
	r.UpdateService(ShardKey{SourceKubernetes, "c1"}, svc.Hostname, svc, []mesh.Endpoint{e("10.1.2.1", "c1", "n1", "v1")})
	r.UpdateService(ShardKey{SourceKubernetes, "c2"}, svc.Hostname, svc, []mesh.Endpoint{e("10.2.2.1", "c2", "n2", "v2")})
	r.UpdateGateways(ShardKey{SourceKubernetes, "c2"}, []Gateway{gw("n2", "192.0.2.2")})
	tc := &TrafficConfig{Domain: mesh.DefaultDomain, DestinationRules: []*networkingv1.DestinationRule{mustDR(t, ingressDR)}}
	for _, y := range vss {
		tc.VirtualServices = append(tc.VirtualServices, mustVS(t, y))
	}
	r.SetTrafficConfig(tc)
	cert, key := testCredential(t, "echo.example.com")
	cred := GatewayCredential{Namespace: "istio-system", Name: "echo-cert", ResourceVersion: "1", CertChain: cert, Key: key}
	ic := &IngressConfig{Credentials: map[string]GatewayCredential{"istio-system/echo-cert": cred}}
	for _, y := range gws {
		ic.Gateways = append(ic.Gateways, mustGateway(t, y))
	}
	r.SetIngressConfig(ic)
	return r.View(), cred
}

var ingressKey = ViewKey{Kind: ProxyIngress, Network: "n1", Namespace: "istio-system", Labels: "app=istio-ingressgateway,istio=ingressgateway"}

// TestIngressGolden compares an ingress view with testdata/ingress.golden and checks that
// it passes Envoy's validation and that its certificate is the Secret's.
func TestIngressGolden(t *testing.T) {
	v, cred := ingressView(t, []string{ingressGateway}, []string{ingressVS})
	res, err := BuildResources(v, ingressKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := res.Snapshot("1"); err != nil {
		t.Fatal(err)
	}
	for _, st := range planTraffic(v).status {
		if !st.Applied {
			t.Errorf("%s %s/%s refused: %s: %s", st.Kind, st.Namespace, st.Name, st.Reason, st.Message)
		}
	}
	secrets := res[resource.SecretType]
	if len(secrets) != 1 {
		t.Fatalf("secrets: %d, want 1", len(secrets))
	}
	s := secrets[0].(*tlsv3.Secret)
	if s.GetName() != "kubernetes://echo-cert" || !bytes.Equal(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes(), cred.CertChain) ||
		!bytes.Equal(s.GetTlsCertificate().GetPrivateKey().GetInlineBytes(), cred.Key) {
		t.Errorf("secret %s is not the Secret's certificate and key", s.GetName())
	}
	got, err := renderGolden(ingressKey, res)
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, "\n# secret kubernetes://echo-cert (certificate chain and key inline, from Secret istio-system/echo-cert)\n"...)
	path := filepath.Join("testdata", "ingress.golden")
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if d := cmp.Diff(string(want), string(got)); d != "" {
		t.Errorf("ingress view differs from %s (-want +got):\n%s", path, d)
	}
}

// TestIngressMutual: a MUTUAL server requires a client certificate verified against the
// credential's ca.crt, delivered over SDS as kubernetes://<name>-cacert (Istio's names);
// without a ca.crt the validation secret is not served and the chain waits for it.
func TestIngressMutual(t *testing.T) {
	mutualGW := "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n" +
		"  servers:\n  - port: {number: 8443, name: mtls, protocol: HTTPS}\n    hosts: [echo.example.com]\n    tls: {mode: MUTUAL, credentialName: echo-cert}\n"
	for _, withCA := range []bool{true, false} {
		v, cred := ingressView(t, []string{mutualGW}, []string{ingressVS})
		if withCA {
			cred.CACert = cred.CertChain // any PEM CA; the proxy tests verify real clients
			v.Ingress.Credentials["istio-system/echo-cert"] = cred
		}
		res, err := BuildResources(v, ingressKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Validate(); err != nil {
			t.Fatal(err)
		}
		if len(res[resource.ListenerType]) != 1 {
			t.Fatalf("listeners: %d", len(res[resource.ListenerType]))
		}
		l := res[resource.ListenerType][0].(*listener.Listener)
		dtc := &tlsv3.DownstreamTlsContext{}
		if err := l.GetFilterChains()[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(dtc); err != nil {
			t.Fatal(err)
		}
		if !dtc.GetRequireClientCertificate().GetValue() ||
			dtc.GetCommonTlsContext().GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName() != "kubernetes://echo-cert-cacert" {
			t.Errorf("MUTUAL chain: %v", dtc)
		}
		var names []string
		for _, r := range res[resource.SecretType] {
			s := r.(*tlsv3.Secret)
			names = append(names, s.GetName())
			if s.GetName() == "kubernetes://echo-cert-cacert" && !bytes.Equal(s.GetValidationContext().GetTrustedCa().GetInlineBytes(), cred.CACert) {
				t.Error("the -cacert secret is not the Secret's ca.crt")
			}
		}
		want := []string{"kubernetes://echo-cert"}
		if withCA {
			want = append(want, "kubernetes://echo-cert-cacert")
		}
		if !slices.Equal(names, want) {
			t.Errorf("with ca.crt %v: secrets %v, want %v", withCA, names, want)
		}
	}
}

// TestIngressScoping: a router whose labels the Gateway does not select gets clusters but
// no listeners; a view without a namespace (no authenticated one) gets no certificate.
func TestIngressScoping(t *testing.T) {
	v, _ := ingressView(t, []string{ingressGateway}, []string{ingressVS})
	other := ingressKey
	other.Labels = "istio=other"
	res, err := BuildResources(v, other)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(res[resource.ListenerType]); n != 0 || len(res[resource.ClusterType]) == 0 {
		t.Errorf("unselected ingress: %d listeners, %d clusters; want 0 and some", n, len(res[resource.ClusterType]))
	}
	noNS := ingressKey
	noNS.Namespace = ""
	res, err = BuildResources(v, noNS)
	if err != nil {
		t.Fatal(err)
	}
	if len(res[resource.SecretType]) != 0 || len(res[resource.ListenerType]) != 3 {
		t.Errorf("view without namespace: %d secrets, %d listeners; want 0 and 3", len(res[resource.SecretType]), len(res[resource.ListenerType]))
	}
	elsewhere := ingressKey
	elsewhere.Namespace = "demo" // a Secret is only ever read from the proxy's own namespace
	if res, _ = BuildResources(v, elsewhere); len(res[resource.SecretType]) != 0 {
		t.Error("view of namespace demo got istio-system's certificate")
	}
}

// TestIngressRefusals: each bad Gateway or gateway VirtualService is refused whole with
// its reason, and a refused Gateway makes no listener.
func TestIngressRefusals(t *testing.T) {
	gwWith := func(servers string) string {
		return "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bad, namespace: istio-system}\nspec:\n  selector: {istio: ingressgateway}\n  servers:\n" + servers
	}
	vsWith := func(body string) string {
		return "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad, namespace: demo}\nspec:\n  gateways: [istio-system/ingress]\n" + body
	}
	for _, c := range []struct{ name, gw, vs, reason, msg string }{
		{"protocol", gwWith("  - port: {number: 80, protocol: MONGO}\n    hosts: ['*']\n"), "", ReasonUnsupported, `protocol "MONGO"`},
		{"istio mutual", gwWith("  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: ISTIO_MUTUAL}\n"), "", ReasonUnsupported, "ISTIO_MUTUAL"},
		{"mutual without credential", gwWith("  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: MUTUAL}\n"), "", ReasonInvalid, "credentialName: required for mode MUTUAL"},
		{"no credential", gwWith("  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE}\n"), "", ReasonInvalid, "credentialName: required"},
		{"file certificate", gwWith("  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE, serverCertificate: /etc/c.pem}\n"), "", ReasonUnsupported, "file certificates"},
		{"port clash", gwWith("  - port: {number: 80, protocol: HTTP}\n    hosts: ['*']\n  - port: {number: 80, protocol: TCP}\n    hosts: ['*']\n"), "", ReasonConflict, "port 80"},
		{"no hosts", gwWith("  - port: {number: 80, protocol: HTTP}\n"), "", ReasonInvalid, "hosts"},
		{"bad host", gwWith("  - port: {number: 80, protocol: HTTP}\n    hosts: ['a.*.com']\n"), "", ReasonInvalid, "wildcard"},
		{"port 0", gwWith("  - port: {number: 0, protocol: HTTP}\n    hosts: ['*']\n"), "", ReasonInvalid, "port.number"},
		{"unknown subset", "", vsWith("  hosts: [x.example.com]\n  http:\n  - route: [{destination: {host: echo, subset: v9}}]\n"), ReasonUnknownSubset, "v9"},
		{"unknown host", "", vsWith("  hosts: [x.example.com]\n  http:\n  - route: [{destination: {host: nope}}]\n"), ReasonUnknownHost, "nope"},
		{"redirect route", "", vsWith("  hosts: [x.example.com]\n  http:\n  - redirect: {uri: /x}\n"), ReasonUnsupported, "redirect"},
		{"weighted tls", "", vsWith("  hosts: [x.example.com]\n  tls:\n  - match: [{sniHosts: [x.example.com]}]\n    route: [{destination: {host: echo}, weight: 50}, {destination: {host: echo}, weight: 50}]\n"), ReasonUnsupported, "exactly one"},
		{"no routes", "", vsWith("  hosts: [x.example.com]\n"), ReasonInvalid, "at least one route"},
	} {
		t.Run(c.name, func(t *testing.T) {
			gws, vss := []string{ingressGateway}, []string{ingressVS}
			if c.gw != "" {
				gws = []string{c.gw}
			}
			if c.vs != "" {
				vss = append(vss, c.vs)
			}
			v, _ := ingressView(t, gws, vss)
			var found bool
			for _, st := range planTraffic(v).status {
				if st.Name != "bad" {
					continue
				}
				found = true
				if st.Applied || st.Reason != c.reason || !strings.Contains(st.Message, c.msg) {
					t.Errorf("%s: applied %v, %s: %s; want refused %s naming %q", st.Kind, st.Applied, st.Reason, st.Message, c.reason, c.msg)
				}
			}
			if !found {
				t.Fatal("no status for the bad object")
			}
			res, err := BuildResources(v, ingressKey)
			if err != nil {
				t.Fatal(err)
			}
			if err := res.Validate(); err != nil {
				t.Fatal(err)
			}
			if c.gw != "" && len(res[resource.ListenerType]) != 0 {
				t.Errorf("refused Gateway made %d listeners", len(res[resource.ListenerType]))
			}
		})
	}
}

// TestIngressNode: routers with LABELS are ingresses, routers without (or in sni-dnat
// mode) east-west gateways; bad labels refuse the node; the key round-trips.
func TestIngressNode(t *testing.T) {
	node := func(meta map[string]any) *core.Node {
		s, err := structpb.NewStruct(meta)
		if err != nil {
			t.Fatal(err)
		}
		return &core.Node{Id: "router~10.0.0.5~ingress-0.istio-system~istio-system.svc.cluster.local", Metadata: s}
	}
	p, err := ProxyFromNode(node(map[string]any{"NETWORK": "n1", "LABELS": map[string]any{"istio": "ingressgateway", "app": "istio-ingressgateway"}}))
	if err != nil {
		t.Fatal(err)
	}
	if p.Key() != ingressKey {
		t.Errorf("key %v, want %v", p.Key(), ingressKey)
	}
	if k, err := ParseViewKey(ingressKey.String()); err != nil || k != ingressKey {
		t.Errorf("ParseViewKey(%q) = %v, %v", ingressKey.String(), k, err)
	}
	for _, meta := range []map[string]any{{}, {"LABELS": map[string]any{"istio": "eastwestgateway"}, "ROUTER_MODE": "sni-dnat"}} {
		if p, err := ProxyFromNode(node(meta)); err != nil || p.Kind != ProxyGateway {
			t.Errorf("%v: kind %s, %v; want gateway", meta, p.Kind, err)
		}
	}
	for _, meta := range []map[string]any{{"LABELS": "istio=x"}, {"LABELS": map[string]any{"istio": 3}}, {"LABELS": map[string]any{"bad key!": "x"}}} {
		if _, err := ProxyFromNode(node(meta)); err == nil {
			t.Errorf("%v: accepted", meta)
		}
	}
}

// TestPlaintextRefusesSecrets: the plaintext port never serves SDS, whatever the node
// claims.
func TestPlaintextRefusesSecrets(t *testing.T) {
	p, err := New(Config{ClusterID: "local", LocalClient: fake.NewClientset(), Debounce: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	cb := p.callbacks()
	n := &core.Node{Id: "router~10.0.0.5~ingress-0.istio-system~istio-system.svc.cluster.local"}
	if err := cb.OnStreamRequest(1, &discovery.DiscoveryRequest{Node: n, TypeUrl: resource.SecretType}); err == nil || !strings.Contains(err.Error(), "authenticated port") {
		t.Errorf("SDS request on the plaintext port: %v", err)
	}
	if err := cb.OnStreamRequest(2, &discovery.DiscoveryRequest{Node: n, TypeUrl: resource.ListenerType}); err != nil {
		t.Errorf("LDS request: %v", err)
	}
}
