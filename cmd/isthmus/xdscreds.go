package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// xdsDialFlags say how a component reaches the primary's xDS: the secure port (TLS
// verified against the mesh root, a service-account token as its credential) unless
// --plaintext-xds is set explicitly.
type xdsDialFlags struct {
	rootCert, kubeconfig, serviceAccount, serverName, netns string
	plaintext                                               bool
}

// dial connects to addr. The token is requested from the component's own cluster for
// serviceAccount ("namespace/name") with the CA's audience, and renewed before it
// expires; the primary reviews it in cluster.
func (f xdsDialFlags) dial(addr string, cluster mesh.ClusterID) (*grpc.ClientConn, error) {
	conn, _, err := f.dialSecure(addr, cluster)
	return conn, err
}

// secureXDS is what a secure xDS connection was made with, for components that also call
// the CA on the same port (the CSR API beside xDS, as istiod serves it): its TLS
// configuration and its token source. Both are nil for a plaintext connection.
type secureXDS struct {
	tls   *tls.Config
	token *tokenCreds
}

// dialSecure is dial, also returning what the secure connection was made with.
func (f xdsDialFlags) dialSecure(addr string, cluster mesh.ClusterID) (*grpc.ClientConn, secureXDS, error) {
	if f.plaintext {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		return conn, secureXDS{}, err
	}
	if f.rootCert == "" || f.serviceAccount == "" {
		return nil, secureXDS{}, errors.New("secure xDS needs --xds-root-cert and --service-account, and --kubeconfig outside a pod (or --plaintext-xds for a plaintext primary)")
	}
	ns, sa, ok := strings.Cut(f.serviceAccount, "/")
	if !ok || ns == "" || sa == "" {
		return nil, secureXDS{}, fmt.Errorf("--service-account %q: want NAMESPACE/NAME", f.serviceAccount)
	}
	// Without --kubeconfig the component runs in a pod (deploy's Deployments): its own
	// service account's in-cluster credentials request the token.
	var (
		rc  *rest.Config
		err error
	)
	if f.kubeconfig == "" {
		if rc, err = rest.InClusterConfig(); err != nil {
			return nil, secureXDS{}, fmt.Errorf("no --kubeconfig and not in a pod: %w", err)
		}
	} else if rc, err = clientcmd.BuildConfigFromFlags("", f.kubeconfig); err != nil {
		return nil, secureXDS{}, fmt.Errorf("--kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, secureXDS{}, err
	}
	name := f.serverName
	if name == "" {
		if host, _, err := net.SplitHostPort(addr); err == nil && net.ParseIP(host) == nil {
			name = host
		} else {
			name = "istiod.istio-system.svc" // what the primary's serving certificate names
		}
	}
	tc, err := xdsTLS(f.rootCert, name)
	if err != nil {
		return nil, secureXDS{}, err
	}
	tok := &tokenCreds{client: client, namespace: ns, name: sa, cluster: cluster}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc)), grpc.WithPerRPCCredentials(tok)}
	if f.netns != "" {
		// From inside a network namespace: a remote cluster's gateway reaching its
		// primary through the primary network's gateway.
		nsh, err := netlab.Open(f.netns)
		if err != nil {
			return nil, secureXDS{}, fmt.Errorf("--xds-netns: %w", err)
		}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return nsh.Dial(ctx, a) }))
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	return conn, secureXDS{tls: tc, token: tok}, err
}

// xdsTLS is the TLS configuration of a secure xDS connection to the primary: its
// certificate is verified for name against the roots rootFile held at start together with
// those it holds at each handshake. A root rotation rewrites the file (Istio's
// istio-ca-root-cert ConfigMap, the plug-in CA's root-cert.pem) before the primary
// serves a certificate from the new root, so the reconnect after the primary's restart
// verifies — with roots read once, the gateway could never reach a primary restarted
// after a rotation again, and kept its last routes for good.
func xdsTLS(rootFile, name string) (*tls.Config, error) {
	pem, err := os.ReadFile(rootFile)
	if err != nil {
		return nil, fmt.Errorf("--xds-root-cert: %w", err)
	}
	if !x509.NewCertPool().AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--xds-root-cert %s: no PEM certificate", rootFile)
	}
	tc, err := trust.RootFileTLS(pem, rootFile, name)
	if err != nil {
		return nil, fmt.Errorf("--xds-root-cert: %w", err)
	}
	return tc, nil
}

// tokenCreds sends a service-account token and the cluster it belongs to, as Istio's
// agents do: "authorization: Bearer <token>" and "clusterid".
type tokenCreds struct {
	client          kubernetes.Interface
	namespace, name string
	cluster         mesh.ClusterID

	mu sync.Mutex
	// tok and exp are the current token; guarded by mu.
	tok string
	exp time.Time
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (t *tokenCreds) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.tok == "" || time.Until(t.exp) < 10*time.Minute {
		exp := int64(3600)
		tr, err := t.client.CoreV1().ServiceAccounts(t.namespace).CreateToken(ctx, t.name, &authnv1.TokenRequest{
			Spec: authnv1.TokenRequestSpec{Audiences: []string{trust.Audience}, ExpirationSeconds: &exp}}, metav1.CreateOptions{})
		if err != nil {
			return nil, fmt.Errorf("token for %s/%s: %w", t.namespace, t.name, err)
		}
		t.tok, t.exp = tr.Status.Token, tr.Status.ExpirationTimestamp.Time
	}
	return map[string]string{"authorization": "Bearer " + t.tok, "clusterid": string(t.cluster)}, nil
}

// Token returns the current token (requested or renewed as GetRequestMetadata does), for
// calls that set their own metadata, such as the certificate agent's CSRs.
func (t *tokenCreds) Token() (string, error) {
	md, err := t.GetRequestMetadata(context.Background())
	if err != nil {
		return "", err
	}
	return strings.TrimPrefix(md["authorization"], "Bearer "), nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials: tokens go over TLS only.
func (t *tokenCreds) RequireTransportSecurity() bool { return true }

// register adds the flags; serviceAccount is the default of --service-account.
func (f *xdsDialFlags) register(fs interface {
	StringVar(*string, string, string, string)
	BoolVar(*bool, string, bool, string)
}, serviceAccount string) {
	fs.StringVar(&f.rootCert, "xds-root-cert", "", "mesh root certificate file that verifies the primary's secure xDS port")
	fs.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of this component's cluster, to request its service-account token (default in a pod: its in-cluster credentials)")
	fs.StringVar(&f.serviceAccount, "service-account", serviceAccount, "NAMESPACE/NAME whose token authenticates to the primary")
	fs.StringVar(&f.serverName, "xds-server-name", "", "TLS name of the primary (default: the address's host name, else istiod.istio-system.svc)")
	fs.StringVar(&f.netns, "xds-netns", "", "network namespace to dial the primary from (a remote cluster's gateway reaching it through another gateway)")
	fs.BoolVar(&f.plaintext, "plaintext-xds", false, "connect to a plaintext xDS port (a primary run with --plaintext-xds-address)")
}
