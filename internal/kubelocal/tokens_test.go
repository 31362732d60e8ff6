package kubelocal_test

import (
	"context"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestLegacyTokenSecretsAreFilled: the service-account token controller runs with the
// cluster's signing key, so a legacy token Secret gets ca.crt and a token the API server
// accepts, as on every real cluster (istioctl create-remote-secret reads them).
func TestLegacyTokenSecretsAreFilled(t *testing.T) {
	needClusters(t)
	ctx := context.Background()
	cs := client(t, shared[0])
	createNamespace(t, cs, "legacy")
	if _, err := cs.CoreV1().ServiceAccounts("legacy").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "reader"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Secrets("legacy").Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "reader-token", Annotations: map[string]string{corev1.ServiceAccountNameKey: "reader"}},
		Type:       corev1.SecretTypeServiceAccountToken,
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var s *corev1.Secret
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		var err error
		if s, err = cs.CoreV1().Secrets("legacy").Get(ctx, "reader-token", metav1.GetOptions{}); err == nil && len(s.Data["token"]) > 0 && len(s.Data["ca.crt"]) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the legacy token Secret was not filled: %v %+v", err, s)
		}
	}
	r, err := cs.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: string(s.Data["token"])}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Status.Authenticated || r.Status.User.Username != "system:serviceaccount:legacy:reader" {
		t.Fatalf("the legacy token is not accepted: %+v", r.Status)
	}
}
