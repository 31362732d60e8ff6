package remote

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Defaults of CreateOptions.
const (
	DefaultNamespace      = "istio-system"
	DefaultServiceAccount = "isthmus-reader"
	// DefaultTokenDuration is how long a reader token lives. A year keeps links from
	// silently expiring; rotate earlier by running create again (the primary swaps the new
	// credential in only after it has synced).
	DefaultTokenDuration = 365 * 24 * time.Hour
)

// managedBy labels every object Create makes, so that operators can find them.
var managedBy = map[string]string{"app.kubernetes.io/managed-by": "isthmus"}

// ReaderRules are all a primary may do in a remote cluster: list and watch what it
// discovers (services, their EndpointSlices, pods for identity and labels, nodes for
// locality, namespaces for network labels, multi-cluster service exports), and create
// TokenReviews so that the CA can authenticate that cluster's workloads. Nothing may be
// read one by one (no get), nothing written, no secrets read.
func ReaderRules() []rbacv1.PolicyRule {
	lw := []string{"list", "watch"}
	return []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"services", "pods", "nodes", "namespaces"}, Verbs: lw},
		{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: lw},
		{APIGroups: []string{"multicluster.x-k8s.io"}, Resources: []string{"serviceexports", "serviceimports"}, Verbs: lw},
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
	}
}

// CreateOptions says what remote secret to make.
type CreateOptions struct {
	// Cluster is the ID the primary will know the cluster by; required.
	Cluster mesh.ClusterID
	// Namespace holds the reader service account in the remote cluster and is the
	// namespace of the secret; default DefaultNamespace.
	Namespace string
	// ServiceAccount is the reader's name; default DefaultServiceAccount.
	ServiceAccount string
	// Server replaces the API server URL the source kubeconfig uses, for API servers that
	// the primary reaches at another address (behind a proxy or load balancer).
	Server string
	// TLSServerName is the name to verify the API server's certificate against when it
	// differs from the host in Server.
	TLSServerName string
	// TokenDuration is the requested token lifetime; default DefaultTokenDuration. The API
	// server may shorten it (--service-account-max-token-expiration).
	TokenDuration time.Duration
	// Type is TypeRemote (the default) or TypeConfig (config.go).
	Type string
	// Rights is RightsIsthmus (the default: ReaderRules) or RightsIstio (rights.go:
	// IstioReaderRules and IstioNamespaceRules, for istiod's remote reader). RightsIstio
	// is for TypeRemote only, with Namespace istiod's system namespace.
	Rights string
}

// Created is the result of Create.
type Created struct {
	// Secret is the remote secret to apply in the primary's cluster.
	Secret *corev1.Secret
	// Expires is when the token stops working, as the API server granted it.
	Expires time.Time
}

// Create makes (or updates) the reader service account and its RBAC in the cluster that
// client and source point at, requests a token for it, and returns the remote secret. It
// is idempotent: running it again refreshes the RBAC rules and issues a new token.
func Create(ctx context.Context, client kubernetes.Interface, source *rest.Config, o CreateOptions) (*Created, error) {
	if _, err := mesh.ParseClusterID(string(o.Cluster)); err != nil {
		return nil, fmt.Errorf("remote: create secret: %w", err)
	}
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.ServiceAccount == "" {
		o.ServiceAccount = DefaultServiceAccount
	}
	if o.TokenDuration == 0 {
		o.TokenDuration = DefaultTokenDuration
	}
	switch o.Type {
	case "":
		o.Type = TypeRemote
	case TypeRemote, TypeConfig:
	default:
		return nil, fmt.Errorf("remote: create secret: type %q (want %q or %q)", o.Type, TypeRemote, TypeConfig)
	}
	rules, err := rulesFor(o.Rights)
	if err != nil {
		return nil, fmt.Errorf("remote: create secret: %w", err)
	}
	if o.Rights == RightsIstio && o.Type == TypeConfig {
		return nil, fmt.Errorf("remote: create secret: rights %q are for a remote cluster istiod reads; an istiod whose config cluster this is needs its own installation's RBAC", RightsIstio)
	}
	if o.TokenDuration < 10*time.Minute {
		return nil, fmt.Errorf("remote: create secret: token duration %s is shorter than the API server's 10 minute minimum", o.TokenDuration)
	}
	server := source.Host
	if o.Server != "" {
		server = o.Server
	}
	if u, err := url.Parse(server); err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("remote: create secret: API server %q is not an https URL (set --server)", server)
	}
	ca, err := caData(source)
	if err != nil {
		return nil, err
	}
	wrap := func(what string, err error) error {
		return fmt.Errorf("remote: create secret for cluster %s: %s: %w", o.Cluster, what, err)
	}
	if err := ensureNamespace(ctx, client, o.Namespace); err != nil {
		return nil, wrap("namespace "+o.Namespace, err)
	}
	if err := ensureServiceAccount(ctx, client, o.Namespace, o.ServiceAccount); err != nil {
		return nil, wrap("service account", err)
	}
	roleName := o.ServiceAccount + "-" + o.Namespace
	if err := ensureRBAC(ctx, client, roleName, o.Namespace, o.ServiceAccount, rules); err != nil {
		return nil, wrap("RBAC", err)
	}
	if err := ensureIstioRBAC(ctx, client, roleName, o.Namespace, o.ServiceAccount, o.Rights == RightsIstio); err != nil {
		return nil, wrap("RBAC", err)
	}
	if o.Type == TypeConfig {
		if err := ensureConfigRBAC(ctx, client, roleName, o.Namespace, o.ServiceAccount); err != nil {
			return nil, wrap("RBAC", err)
		}
	}
	secs := int64(o.TokenDuration / time.Second)
	tr, err := client.CoreV1().ServiceAccounts(o.Namespace).CreateToken(ctx, o.ServiceAccount, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{ExpirationSeconds: &secs},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, wrap("token request", err)
	}
	kc := clientcmdapi.NewConfig()
	name := string(o.Cluster)
	kc.Clusters[name] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca, TLSServerName: o.TLSServerName}
	kc.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kc.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: name}
	kc.CurrentContext = name
	data, err := clientcmd.Write(*kc)
	if err != nil {
		return nil, wrap("write kubeconfig", err)
	}
	secret := NewSecret(o.Namespace, o.Cluster, data)
	if o.Type == TypeConfig {
		delete(secret.Labels, MultiClusterLabel)
	}
	return &Created{Secret: secret, Expires: tr.Status.ExpirationTimestamp.Time}, nil
}

// caData returns the CA bundle the source configuration trusts, reading a file reference
// on the operator's machine so that the secret carries it inline.
func caData(source *rest.Config) ([]byte, error) {
	if len(source.TLSClientConfig.CAData) > 0 {
		return source.TLSClientConfig.CAData, nil
	}
	if source.TLSClientConfig.CAFile != "" {
		data, err := os.ReadFile(source.TLSClientConfig.CAFile)
		if err != nil {
			return nil, fmt.Errorf("remote: read the API server CA: %w", err)
		}
		return data, nil
	}
	if source.TLSClientConfig.Insecure {
		return nil, errors.New("remote: the source kubeconfig skips TLS verification, so there is no CA to hand to the primary; use a kubeconfig with certificate-authority-data")
	}
	return nil, nil // the system roots verify the API server
}

func ensureNamespace(ctx context.Context, client kubernetes.Interface, ns string) error {
	_, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

func ensureServiceAccount(ctx context.Context, client kubernetes.Interface, ns, name string) error {
	_, err := client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managedBy},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// ensureRBAC creates the reader ClusterRole with rules and its binding, or resets them to
// rules.
func ensureRBAC(ctx context.Context, client kubernetes.Interface, name, ns, sa string, rules []rbacv1.PolicyRule) error {
	roles := client.RbacV1().ClusterRoles()
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: managedBy}, Rules: rules}
	if _, err := roles.Create(ctx, role, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		existing, err := roles.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		existing.Rules = role.Rules
		if _, err := roles.Update(ctx, existing, metav1.UpdateOptions{}); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	bindings := client.RbacV1().ClusterRoleBindings()
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: managedBy},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}},
	}
	if _, err := bindings.Create(ctx, binding, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		existing, err := bindings.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		existing.Subjects = binding.Subjects // RoleRef is immutable and always the same name
		_, err = bindings.Update(ctx, existing, metav1.UpdateOptions{})
		return err
	} else if err != nil {
		return err
	}
	return nil
}
