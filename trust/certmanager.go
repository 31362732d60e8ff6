package trust

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// Annotation on the CertificateRequests a CertManagerSigner creates: the identity the CA
// authenticated, for approvers (e.g. an approver-policy) to check against the CSR.
const AnnotationIdentity = "isthmus.io/identity"

// CertManagerSigner signs workload certificates through cert-manager: each request
// becomes a CertificateRequest against a configured issuer, and the signer waits for it to
// be approved and issued. cert-manager signs the CSR as it is, so the CSR must name the
// caller's SPIFFE ID (Istio's agents do); the issued leaf is checked to carry exactly that
// identity and to chain to the trust anchors before it is returned.
type CertManagerSigner struct {
	// Client is a cert-manager clientset of the cluster that holds the issuer; required.
	Client cmclient.Interface
	// Namespace of the CertificateRequests (and of an Issuer); required.
	Namespace string
	// Issuer names the Issuer or ClusterIssuer; required.
	Issuer cmmeta.IssuerReference
	// Anchors are the roots issued leaves must chain to; required. They end every chain
	// returned, as Istio's agents expect.
	Anchors []*x509.Certificate
	// Timeout bounds the wait for approval and issuance; default 30 s.
	Timeout time.Duration
	// Keep leaves CertificateRequests in place after issuance (for auditing); by default
	// they are deleted once read.
	Keep bool
}

// Sign implements Signer: it creates one CertificateRequest, polls it until cert-manager
// decides (denied, invalid and failed are ErrSignerRefused; no decision within Timeout is
// context.DeadlineExceeded), checks the leaf and returns leaf, intermediates, anchors.
// The CertificateRequest is deleted on every path unless Keep is set, with its own short
// deadline so that a cancelled ctx does not leave it behind.
func (s *CertManagerSigner) Sign(ctx context.Context, csr *x509.CertificateRequest, id mesh.Identity, ttl time.Duration) ([]string, error) {
	if s.Client == nil || s.Namespace == "" || s.Issuer.Name == "" || len(s.Anchors) == 0 {
		return nil, errors.New("trust: cert-manager signer: Client, Namespace, Issuer and Anchors are required")
	}
	if len(csr.URIs) == 0 {
		return nil, fmt.Errorf("%w: cert-manager signs a CSR as it is, so it must name %s as its URI SAN", ErrBadCSR, id)
	}
	if err := checkCSRIdentity(csr, id); err != nil {
		return nil, err
	}
	timeout := s.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	crs := s.Client.CertmanagerV1().CertificateRequests(s.Namespace)
	cr, err := crs.Create(ctx, &cmapi.CertificateRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "isthmus-", Namespace: s.Namespace,
			Annotations: map[string]string{AnnotationIdentity: id.String()},
			Labels:      map[string]string{"app.kubernetes.io/managed-by": "isthmus"}},
		Spec: cmapi.CertificateRequestSpec{
			Request:   csrPEM(csr.Raw),
			IssuerRef: s.Issuer,
			Duration:  &metav1.Duration{Duration: ttl},
			Usages:    []cmapi.KeyUsage{cmapi.UsageDigitalSignature, cmapi.UsageKeyEncipherment, cmapi.UsageServerAuth, cmapi.UsageClientAuth},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("trust: cert-manager: create CertificateRequest: %w", err)
	}
	if !s.Keep {
		defer func() {
			dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer dcancel()
			_ = crs.Delete(dctx, cr.Name, metav1.DeleteOptions{})
		}()
	}
	notIssued := func(last error) error {
		err := fmt.Errorf("trust: cert-manager: CertificateRequest %s/%s not issued within %s (is it approved? is the issuer %s ready?): %w", s.Namespace, cr.Name, timeout, s.Issuer.Name, cmp.Or(ctx.Err(), context.DeadlineExceeded))
		if last != nil {
			err = fmt.Errorf("%w (last poll: %v)", err, last)
		}
		return err
	}
	// Polled, not watched: one request lives for a second or two, and a poll needs only
	// get permission on CertificateRequests. The interval doubles from 50 ms to 500 ms so
	// that a slow issuer does not spend the client's rate limit.
	interval := 50 * time.Millisecond
	var lastErr error
	for {
		cur, err := crs.Get(ctx, cr.Name, metav1.GetOptions{})
		switch {
		case err != nil && ctx.Err() != nil:
			return nil, notIssued(lastErr)
		case err != nil && apierrors.ReasonForError(err) != metav1.StatusReasonUnknown:
			// The API server answered (not found, forbidden, …): polling again will not help.
			return nil, fmt.Errorf("trust: cert-manager: %w", err)
		case err != nil:
			// Transport trouble or the client's rate limiter refusing a wait that would
			// outlast the deadline: the request may still be issued, so keep polling until
			// the deadline and report what the last poll said.
			lastErr = err
		default:
			if c := condition(cur, cmapi.CertificateRequestConditionDenied); c != nil && c.Status == cmmeta.ConditionTrue {
				return nil, fmt.Errorf("%w: cert-manager: CertificateRequest %s/%s denied: %s: %s", ErrSignerRefused, s.Namespace, cr.Name, c.Reason, c.Message)
			}
			if c := condition(cur, cmapi.CertificateRequestConditionInvalidRequest); c != nil && c.Status == cmmeta.ConditionTrue {
				return nil, fmt.Errorf("%w: cert-manager: CertificateRequest %s/%s invalid: %s", ErrSignerRefused, s.Namespace, cr.Name, c.Message)
			}
			if c := condition(cur, cmapi.CertificateRequestConditionReady); c != nil {
				if c.Status == cmmeta.ConditionFalse && c.Reason == cmapi.CertificateRequestReasonFailed {
					return nil, fmt.Errorf("%w: cert-manager: CertificateRequest %s/%s failed: %s", ErrSignerRefused, s.Namespace, cr.Name, c.Message)
				}
				if c.Status == cmmeta.ConditionTrue && len(cur.Status.Certificate) > 0 {
					return s.chain(cur, id)
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil, notIssued(lastErr)
		case <-time.After(interval):
		}
		interval = min(2*interval, 500*time.Millisecond)
	}
}

// chain checks what cert-manager issued and returns it leaf first, anchors last. The leaf
// must carry exactly id and verify for client auth to one of s.Anchors, through the
// intermediates cert-manager returned with it or as its CA; the chain returned is the
// verified one, not what cert-manager sent, so an extra or missing certificate there
// cannot end up in a workload's files.
func (s *CertManagerSigner) chain(cr *cmapi.CertificateRequest, id mesh.Identity) ([]string, error) {
	certs, err := parseCerts(cr.Status.Certificate)
	if err != nil || len(certs) == 0 {
		return nil, fmt.Errorf("%w: cert-manager: CertificateRequest %s/%s: unreadable certificate (%v)", ErrSignerRefused, cr.Namespace, cr.Name, err)
	}
	leaf := certs[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		return nil, fmt.Errorf("%w: cert-manager issued a certificate for %v, not %s; refusing it", ErrSignerRefused, leaf.URIs, id)
	}
	roots := x509.NewCertPool()
	for _, a := range s.Anchors {
		roots.AddCert(a)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if extra, err := parseCerts(cr.Status.CA); err == nil {
		for _, c := range extra {
			inter.AddCert(c) // an issuer's CA may be an intermediate under the anchors
		}
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		return nil, fmt.Errorf("%w: cert-manager's certificate does not chain to the mesh's trust anchors: %v", ErrSignerRefused, err)
	}
	var out []string
	for _, c := range chains[0][:len(chains[0])-1] {
		out = append(out, string(certPEM(c)))
	}
	return append(out, string(certsPEM(s.Anchors))), nil
}

// condition returns cr's condition of type t, nil when it has none yet.
func condition(cr *cmapi.CertificateRequest, t cmapi.CertificateRequestConditionType) *cmapi.CertificateRequestCondition {
	for i := range cr.Status.Conditions {
		if cr.Status.Conditions[i].Type == t {
			return &cr.Status.Conditions[i]
		}
	}
	return nil
}
