package trust_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	apiextv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// installCertManagerCRDs applies cert-manager's own CRDs, read from its Go module, to the
// test cluster and waits until they are served.
func installCertManagerCRDs(t *testing.T) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/cert-manager/cert-manager").Output()
	if err != nil {
		t.Fatalf("find cert-manager's module: %v", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "deploy", "crds")
	client, err := apiext.NewForConfig(env.cluster.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, name := range []string{"cert-manager.io_certificaterequests.yaml", "cert-manager.io_issuers.yaml", "cert-manager.io_clusterissuers.yaml"} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		var crd apiextv1.CustomResourceDefinition
		if err := yaml.Unmarshal(data, &crd); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := client.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, &crd, metav1.CreateOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
			t.Fatalf("%s: %v", name, err)
		}
		kubetest.Eventually(t, 30*time.Second, name+" established", func() error {
			got, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			for _, c := range got.Status.Conditions {
				if c.Type == apiextv1.Established && c.Status == apiextv1.ConditionTrue {
					return nil
				}
			}
			return errors.New("not established")
		})
	}
}

// playIssuer stands in for cert-manager's controller and an approver: it approves and
// signs requests with ca, except for service accounts whose names ask for a failure.
func playIssuer(ctx context.Context, t *testing.T, cm cmclient.Interface, ns string, ca *trust.Authority) {
	crs := cm.CertmanagerV1().CertificateRequests(ns)
	set := func(cr *cmapi.CertificateRequest, conds ...cmapi.CertificateRequestCondition) {
		cr.Status.Conditions = append(cr.Status.Conditions, conds...)
		if _, err := crs.UpdateStatus(ctx, cr, metav1.UpdateOptions{}); err != nil && ctx.Err() == nil {
			t.Logf("issuer: update status: %v", err)
		}
	}
	cond := func(ty cmapi.CertificateRequestConditionType, st cmmeta.ConditionStatus, reason, msg string) cmapi.CertificateRequestCondition {
		return cmapi.CertificateRequestCondition{Type: ty, Status: st, Reason: reason, Message: msg}
	}
	for ctx.Err() == nil {
		list, err := crs.List(ctx, metav1.ListOptions{})
		if err == nil {
			for i := range list.Items {
				cr := &list.Items[i]
				if len(cr.Status.Conditions) > 0 {
					continue
				}
				id := cr.Annotations[trust.AnnotationIdentity]
				switch {
				case strings.HasSuffix(id, "/sa/cm-slow"):
				case strings.HasSuffix(id, "/sa/cm-deny"):
					set(cr, cond(cmapi.CertificateRequestConditionDenied, cmmeta.ConditionTrue, "PolicyDenied", "not allowed by policy"))
				case strings.HasSuffix(id, "/sa/cm-fail"):
					set(cr, cond(cmapi.CertificateRequestConditionApproved, cmmeta.ConditionTrue, "Approved", ""),
						cond(cmapi.CertificateRequestConditionReady, cmmeta.ConditionFalse, cmapi.CertificateRequestReasonFailed, "issuer not ready"))
				default:
					csr, err := trust.ParseCSR(cr.Spec.Request)
					if err != nil {
						t.Errorf("issuer: %v", err)
						continue
					}
					signAs, _ := mesh.ParseIdentity(csr.URIs[0].String())
					if strings.HasSuffix(id, "/sa/cm-wrong") { // a misbehaving issuer
						signAs, _ = mesh.ParseIdentity("spiffe://cluster.local/ns/demo/sa/someone-else")
						csr.URIs = nil
					}
					chain, err := ca.Sign(context.Background(), csr, signAs, cr.Spec.Duration.Duration)
					if err != nil {
						t.Errorf("issuer: %v", err)
						continue
					}
					cr.Status.Certificate = []byte(strings.Join(chain[:len(chain)-1], ""))
					cr.Status.CA = []byte(chain[len(chain)-1])
					set(cr, cond(cmapi.CertificateRequestConditionApproved, cmmeta.ConditionTrue, "Approved", ""),
						cond(cmapi.CertificateRequestConditionReady, cmmeta.ConditionTrue, cmapi.CertificateRequestReasonIssued, "signed"))
				}
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestCertManagerSigner: the CSR API signing through cert-manager CertificateRequests on a
// real API server with cert-manager's CRDs: issued chains verify to the mesh root, and a
// denied, failed, misissued or unanswered request is refused with its reason.
func TestCertManagerSigner(t *testing.T) {
	needEnv(t)
	installCertManagerCRDs(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cm, err := cmclient.NewForConfig(env.cluster.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	const ns = "demo"
	serviceAccountToken(t, ns, "cm-setup", nil, nil) // makes the namespace
	// The API server compiles a new CRD's validation on first use, which takes seconds on
	// a loaded machine: wait until it serves CertificateRequests before timing anything.
	kubetest.Eventually(t, 60*time.Second, "CertificateRequests served", func() error {
		wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
		defer wcancel()
		csr, _ := csrPEM(t, "spiffe://cluster.local/ns/demo/sa/warm-up")
		_, err := cm.CertmanagerV1().CertificateRequests(ns).Create(wctx, &cmapi.CertificateRequest{
			ObjectMeta: metav1.ObjectMeta{GenerateName: "warm-up-"},
			Spec:       cmapi.CertificateRequestSpec{Request: csr, IssuerRef: cmmeta.IssuerReference{Name: "mesh-ca"}},
		}, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err
	})
	go playIssuer(ctx, t, cm, ns, env.ca)

	signer := &trust.CertManagerSigner{Client: cm, Namespace: ns, Issuer: cmmeta.IssuerReference{Name: "mesh-ca", Kind: "Issuer", Group: "cert-manager.io"},
		Anchors: []*x509.Certificate{env.root.Cert}, Timeout: 5 * time.Second}
	srv, err := trust.NewServer(trust.ServerConfig{Authority: env.ca, Signer: signer, Clusters: trust.StaticClients{"ca-1": env.client},
		LocalCluster: "ca-1", Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	certs, key, _ := env.ca.IssueServing([]string{"istiod.istio-system.svc"}, time.Hour)
	tc, _ := tls.X509KeyPair(bytes.Join(certs, nil), pemKey(key))
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{tc}, ClientAuth: tls.RequestClientCert})))
	srv.Register(g)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go g.Serve(l)
	defer g.Stop()
	pool := x509.NewCertPool()
	pool.AddCert(env.root.Cert)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewIstioCertificateServiceClient(conn)

	request := func(sa string, withURI bool) (*pb.IstioCertificateResponse, error) {
		uri := ""
		if withURI {
			uri = "spiffe://cluster.local/ns/demo/sa/" + sa
		}
		csr, _ := csrPEM(t, uri)
		tok := serviceAccountToken(t, ns, sa, []string{trust.Audience}, nil)
		return client.CreateCertificate(withToken(tok), &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: 3600})
	}

	resp, err := request("cm-ok", true)
	if err != nil {
		t.Fatalf("issuance through cert-manager: %v", err)
	}
	var chain []*x509.Certificate
	for _, p := range resp.CertChain {
		c, err := x509.ParseCertificate(pemDER(t, p))
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	if chain[0].URIs[0].String() != "spiffe://cluster.local/ns/demo/sa/cm-ok" {
		t.Fatalf("identity %v", chain[0].URIs)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1 : len(chain)-1] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("chain does not verify to the mesh root: %v", err)
	}
	if !chain[len(chain)-1].Equal(env.root.Cert) {
		t.Fatal("the chain does not end with the mesh root")
	}

	for _, tc := range []struct {
		sa      string
		withURI bool
		code    codes.Code
		says    string
	}{
		{"cm-nouri", false, codes.InvalidArgument, "must name spiffe://cluster.local/ns/demo/sa/cm-nouri"},
		{"cm-deny", true, codes.FailedPrecondition, "denied: PolicyDenied: not allowed by policy"},
		{"cm-fail", true, codes.FailedPrecondition, "failed: issuer not ready"},
		{"cm-wrong", true, codes.FailedPrecondition, "not spiffe://cluster.local/ns/demo/sa/cm-wrong"},
		{"cm-slow", true, codes.DeadlineExceeded, "is it approved?"},
	} {
		_, err := request(tc.sa, tc.withURI)
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: got %v; want %s saying %q", tc.sa, err, tc.code, tc.says)
		}
	}
	kubetest.Eventually(t, 10*time.Second, "CertificateRequests cleaned up", func() error {
		list, err := cm.CertmanagerV1().CertificateRequests(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(list.Items) > 0 {
			return errors.New("requests left behind")
		}
		return nil
	})
}
