package remote

import (
	"context"
	"fmt"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Rights of CreateOptions.Rights: whose reader a remote credential is for.
const (
	// RightsIsthmus is an Isthmus primary's reader, ReaderRules: the default, and all an
	// Isthmus primary needs.
	RightsIsthmus = "isthmus"
	// RightsIstio is istiod's remote reader, IstioReaderRules: what istiod reads from a
	// remote cluster, so that the same secret serves both control planes (running both
	// on one fleet, or migrating between them).
	RightsIstio = "istio"
)

// IstioReaderRules are what istiod's remote-cluster controller reads cluster wide in a
// remote cluster, measured on a real istiod at istiobin.Version
// (TestIstiodSyncsFromIsthmusRemoteSecret records every request its reader makes in the
// remote API server's audit log, and requires each one granted, none refused, and each
// rule added here used). They are ReaderRules plus what istiod watches beyond them:
//
//   - secrets, in every namespace: istiod's credentials controller (the TLS secrets that
//     Gateways and DestinationRules name by credentialName);
//   - customresourcedefinitions: istiod watches which optional kinds (Gateway API,
//     multi-cluster services) the cluster serves before it watches them.
//
// and IstioNamespaceRules in the system namespace. Still only list and watch (and
// TokenReviews): no get, no writes. Every Secret of the cluster becomes readable, which is
// why these are not the default.
func IstioReaderRules() []rbacv1.PolicyRule {
	lw := []string{"list", "watch"}
	return append(ReaderRules(),
		rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: lw},
		rbacv1.PolicyRule{APIGroups: []string{"apiextensions.k8s.io"}, Resources: []string{"customresourcedefinitions"}, Verbs: lw},
	)
}

// IstioNamespaceRules are granted with RightsIstio in the namespace of the reader, which
// must be istiod's system namespace (istio-system unless istiod runs elsewhere): list and
// watch ConfigMaps, from which istiod reads the remote cluster's own mesh configuration
// (ConfigMap istio). istiod watches no ConfigMap elsewhere in a remote cluster.
func IstioNamespaceRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"list", "watch"}}}
}

// ensureIstioRBAC grants (istio true) or takes away (false) IstioNamespaceRules: a Role and
// RoleBinding <name>-istio in ns for the reader, reset to the current rules when present.
func ensureIstioRBAC(ctx context.Context, client kubernetes.Interface, name, ns, sa string, istio bool) error {
	name += "-istio"
	if !istio {
		if err := client.RbacV1().RoleBindings(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("istio RoleBinding: %w", err)
		}
		if err := client.RbacV1().Roles(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("istio Role: %w", err)
		}
		return nil
	}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managedBy}, Rules: IstioNamespaceRules()}
	if _, err := client.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().Roles(ns).Update(ctx, role, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("istio Role: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("istio Role: %w", err)
	}
	rb := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managedBy},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}}}
	if _, err := client.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().RoleBindings(ns).Update(ctx, rb, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("istio RoleBinding: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("istio RoleBinding: %w", err)
	}
	return nil
}

// rulesFor returns the reader rules of rights ("" is RightsIsthmus), or an error naming
// the valid values.
func rulesFor(rights string) ([]rbacv1.PolicyRule, error) {
	switch rights {
	case "", RightsIsthmus:
		return ReaderRules(), nil
	case RightsIstio:
		return IstioReaderRules(), nil
	}
	return nil, fmt.Errorf("rights %q (want %q or %q)", rights, RightsIsthmus, RightsIstio)
}
