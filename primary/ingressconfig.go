package primary

import (
	"cmp"
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"slices"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// resGateways is the Gateway resource of networking.istio.io/v1.
const resGateways = "gateways"

// CACertKey is the key of a credential Secret's client CA (Istio's ca.crt), which MUTUAL
// Gateway servers verify clients against.
const CACertKey = "ca.crt"

// ingressConfigWatcher reads Gateways (once their CRD exists) and the kubernetes.io/tls
// Secrets of the system namespace — the only namespace a router may run in, so the only
// one ingress certificates are read from — and stores every change as an IngressConfig.
type ingressConfigWatcher struct {
	istio     istioclient.Interface
	kube      kubernetes.Interface
	discovery discovery.DiscoveryInterface
	reg       *Registry
	namespace string // the system namespace
	poll      time.Duration
	log       *slog.Logger
}

func (w *ingressConfigWatcher) crdInstalled() bool {
	return servedResources(w.discovery, istioNetworkingGV)[resGateways]
}

// run watches until ctx ends; it returns nil then.
func (w *ingressConfigWatcher) run(ctx context.Context) error {
	t := time.NewTicker(w.poll)
	defer t.Stop()
	for !w.crdInstalled() {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	changed, h := coalescingHandler()
	ifactory := istioinformers.NewSharedInformerFactory(w.istio, 0)
	gwInf := ifactory.Networking().V1().Gateways()
	if _, err := gwInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: ingress config: %w", err)
	}
	kfactory := informers.NewSharedInformerFactoryWithOptions(w.kube, 0, informers.WithNamespace(w.namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("type", string(corev1.SecretTypeTLS)).String()
		}))
	secInf := kfactory.Core().V1().Secrets()
	if _, err := secInf.Informer().AddEventHandler(h); err != nil {
		return fmt.Errorf("primary: ingress config: %w", err)
	}
	ifactory.Start(ctx.Done())
	kfactory.Start(ctx.Done())
	defer ifactory.Shutdown()
	defer kfactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), gwInf.Informer().HasSynced, secInf.Informer().HasSynced) {
		return nil
	}
	w.log.Info("ingress config: watching Gateways and TLS Secrets", "secretNamespace", w.namespace)
	bad := map[string]string{} // Secrets already logged as unusable, by key → resource version
	for {
		gws, err1 := gwInf.Lister().List(labels.Everything())
		secs, err2 := secInf.Lister().Secrets(w.namespace).List(labels.Everything())
		if err := cmp.Or(err1, err2); err != nil {
			w.log.Error("ingress config: listing", "err", err)
		} else {
			c := &IngressConfig{Gateways: slices.Clone(gws), Credentials: map[string]GatewayCredential{}}
			slices.SortFunc(c.Gateways, func(a, b *networkingv1.Gateway) int { return byPrecedence(&a.ObjectMeta, &b.ObjectMeta) })
			for _, s := range secs {
				k := s.Namespace + "/" + s.Name
				if err := ParseCredential(s.Data[corev1.TLSCertKey], s.Data[corev1.TLSPrivateKeyKey]); err != nil {
					if bad[k] != s.ResourceVersion {
						w.log.Warn("ingress config: Secret not usable as a Gateway credential", "secret", k, "err", err)
						bad[k] = s.ResourceVersion
					}
					continue
				}
				ca := s.Data[CACertKey]
				if len(ca) > 0 && !x509.NewCertPool().AppendCertsFromPEM(ca) {
					if bad[k] != s.ResourceVersion {
						w.log.Warn("ingress config: Secret's ca.crt holds no PEM certificate; MUTUAL servers naming it wait", "secret", k)
						bad[k] = s.ResourceVersion
					}
					ca = nil
				}
				c.Credentials[k] = GatewayCredential{Namespace: s.Namespace, Name: s.Name, ResourceVersion: s.ResourceVersion,
					CertChain: s.Data[corev1.TLSCertKey], Key: s.Data[corev1.TLSPrivateKeyKey], CACert: ca}
			}
			w.reg.SetIngressConfig(c)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}
