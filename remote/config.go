package remote

import (
	"context"
	"fmt"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Secret types of CreateOptions.Type, as istioctl create-remote-secret --type names them.
const (
	// TypeRemote is a cluster the primary discovers endpoints in (ReaderRules).
	TypeRemote = "remote"
	// TypeConfig is the config cluster of an external control plane: the cluster whose
	// API holds the mesh's configuration. Its credential is the control plane's own
	// --kubeconfig, so the secret carries no istio/multiCluster label (no primary
	// watches it as a remote).
	TypeConfig = "config"
)

// ConfigRules are what reading mesh configuration needs beyond ReaderRules, cluster
// wide: list and watch the Istio configuration kinds (networking, security, telemetry).
// The remote secrets themselves are granted in the control-plane namespace only
// (ConfigNamespaceRules). Still no get, no write.
func ConfigRules() []rbacv1.PolicyRule {
	lw := []string{"list", "watch"}
	return []rbacv1.PolicyRule{{
		APIGroups: []string{"networking.istio.io", "security.istio.io", "telemetry.istio.io"},
		Resources: []string{"*"}, Verbs: lw,
	}}
}

// ConfigNamespaceRules are granted in the control-plane namespace of a config cluster:
// list and watch Secrets, the remote secrets that name the other mesh clusters.
func ConfigNamespaceRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"list", "watch"}}}
}

// ensureConfigRBAC adds the config cluster's rights: ConfigRules in a second ClusterRole,
// ConfigNamespaceRules in a Role of ns, each bound to the reader; existing objects are
// reset to the current rules.
func ensureConfigRBAC(ctx context.Context, client kubernetes.Interface, name, ns, sa string) error {
	subjects := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}}
	name += "-config"
	cr := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: managedBy}, Rules: ConfigRules()}
	if _, err := client.RbacV1().ClusterRoles().Create(ctx, cr, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().ClusterRoles().Update(ctx, cr, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("config ClusterRole: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("config ClusterRole: %w", err)
	}
	crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: managedBy},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: name}, Subjects: subjects}
	if _, err := client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().ClusterRoleBindings().Update(ctx, crb, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("config ClusterRoleBinding: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("config ClusterRoleBinding: %w", err)
	}
	role := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managedBy}, Rules: ConfigNamespaceRules()}
	if _, err := client.RbacV1().Roles(ns).Create(ctx, role, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().Roles(ns).Update(ctx, role, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("config Role: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("config Role: %w", err)
	}
	rb := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: managedBy},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: name}, Subjects: subjects}
	if _, err := client.RbacV1().RoleBindings(ns).Create(ctx, rb, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
		if _, err := client.RbacV1().RoleBindings(ns).Update(ctx, rb, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("config RoleBinding: %w", err)
		}
	} else if err != nil {
		return fmt.Errorf("config RoleBinding: %w", err)
	}
	return nil
}
