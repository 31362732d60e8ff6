package federation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// ExportPolicyConfigMap is the ConfigMap in the control-plane namespace that holds the
// mesh-level export policy: key "policy", an ExportPolicy in JSON. Without it nothing is
// exported, whatever ServiceExports exist.
const ExportPolicyConfigMap = "isthmus-federation-exports"

const exportPolicyKey = "policy"

// KubeExportsConfig configures NewKubeExports.
type KubeExportsConfig struct {
	// Client reads Services and the policy ConfigMap; MCS reads ServiceExports. Required.
	Client kubernetes.Interface
	MCS    mcsclient.Interface
	// Namespace holds ExportPolicyConfigMap. Required.
	Namespace string
	// TrustDomain is this mesh's: each export lists the service accounts of the pods its
	// Service selects as spiffe://<TrustDomain>/ns/<ns>/sa/<sa>. Empty lists none (the
	// importers then require the trust domain alone).
	TrustDomain mesh.TrustDomain
	// Resync is the informers' resync period; default 10 minutes.
	Resync time.Duration
	// Log defaults to discarding.
	Log *slog.Logger
	// OnChange, if set, receives the complete export set after every computation that
	// changed it, from Run's goroutine (never concurrently): the primary's gateways route
	// exported services from it (docs/federation.md). Changed stays the Endpoint's.
	OnChange func([]Export)
}

// KubeExports is the ExportSource of a Kubernetes cluster: a service is exported to a
// peer when an MCS ServiceExport of the same namespace and name exists, its Service
// exists, and the export policy names the peer and the namespace. Everything else that
// was asked for and cannot be exported is listed by Problems, so an export is never
// silently invisible.
type KubeExports struct {
	cfg     KubeExportsConfig
	changed chan struct{}

	mu sync.Mutex
	// exports and problems are the last computed set; guarded by mu.
	exports  []Export
	problems []string
}

// NewKubeExports validates cfg; Run watches the cluster.
func NewKubeExports(cfg KubeExportsConfig) (*KubeExports, error) {
	if cfg.Client == nil || cfg.MCS == nil || cfg.Namespace == "" {
		return nil, errors.New("federation: kube exports: Client, MCS and Namespace are required")
	}
	if cfg.TrustDomain != "" {
		if _, err := mesh.ParseTrustDomain(string(cfg.TrustDomain)); err != nil {
			return nil, fmt.Errorf("federation: kube exports: %w", err)
		}
	}
	if cfg.Resync == 0 {
		cfg.Resync = 10 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &KubeExports{cfg: cfg, changed: make(chan struct{}, 1)}, nil
}

// Exports implements ExportSource.
func (k *KubeExports) Exports() []Export {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.exports)
}

// Changed implements ExportSource.
func (k *KubeExports) Changed() <-chan struct{} { return k.changed }

// Problems returns why each ServiceExport that is not exported is not.
func (k *KubeExports) Problems() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.problems)
}

// Run watches ServiceExports, Services and the policy until ctx ends, recomputing the
// exports (level-triggered: every event just asks for a recomputation).
func (k *KubeExports) Run(ctx context.Context) error {
	kick := make(chan struct{}, 1)
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke(kick) },
		UpdateFunc: func(any, any) { poke(kick) },
		DeleteFunc: func(any) { poke(kick) },
	}
	kf := informers.NewSharedInformerFactory(k.cfg.Client, k.cfg.Resync)
	svcs := kf.Core().V1().Services()
	cmf := informers.NewSharedInformerFactoryWithOptions(k.cfg.Client, k.cfg.Resync, informers.WithNamespace(k.cfg.Namespace))
	cms := cmf.Core().V1().ConfigMaps()
	pods := kf.Core().V1().Pods()
	mf := mcsinformers.NewSharedInformerFactory(k.cfg.MCS, k.cfg.Resync)
	ses := mf.Multicluster().V1alpha1().ServiceExports()
	infs := []cache.SharedIndexInformer{svcs.Informer(), cms.Informer(), ses.Informer()}
	if k.cfg.TrustDomain != "" {
		infs = append(infs, pods.Informer())
	}
	for _, inf := range infs {
		if _, err := inf.AddEventHandler(h); err != nil {
			return fmt.Errorf("federation: kube exports: %w", err)
		}
	}
	kf.Start(ctx.Done())
	cmf.Start(ctx.Done())
	mf.Start(ctx.Done())
	defer kf.Shutdown()
	defer cmf.Shutdown()
	defer mf.Shutdown()
	for _, inf := range infs {
		if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
			return nil
		}
	}
	podsOf := func(string, labels.Selector) ([]*corev1.Pod, error) { return nil, nil }
	if k.cfg.TrustDomain != "" {
		podsOf = func(ns string, sel labels.Selector) ([]*corev1.Pod, error) { return pods.Lister().Pods(ns).List(sel) }
	}
	for {
		k.recompute(func(ns, name string) (*corev1.Service, error) { return svcs.Lister().Services(ns).Get(name) },
			func() (*corev1.ConfigMap, error) {
				return cms.Lister().ConfigMaps(k.cfg.Namespace).Get(ExportPolicyConfigMap)
			},
			func() ([]mesh.ServiceKey, error) {
				l, err := ses.Lister().List(labels.Everything())
				out := make([]mesh.ServiceKey, 0, len(l))
				for _, se := range l {
					out = append(out, mesh.ServiceKey{Namespace: se.Namespace, Name: se.Name})
				}
				return out, err
			}, podsOf)
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		}
	}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// recompute derives the exports from the listers' content.
// podsOf lists the pods of a namespace a selector matches (the Service's endpoints, whose
// service accounts the export lists).
func (k *KubeExports) recompute(service func(ns, name string) (*corev1.Service, error), policyCM func() (*corev1.ConfigMap, error), exportsList func() ([]mesh.ServiceKey, error),
	podsOf func(ns string, sel labels.Selector) ([]*corev1.Pod, error)) {
	var problems []string
	var policy ExportPolicy
	cm, err := policyCM()
	switch {
	case apierrors.IsNotFound(err):
		problems = append(problems, fmt.Sprintf("no export policy (ConfigMap %s/%s): nothing is exported", k.cfg.Namespace, ExportPolicyConfigMap))
	case err != nil:
		problems = append(problems, fmt.Sprintf("export policy: %v", err))
	default:
		p, perr := ParseExportPolicy(cm.Data[exportPolicyKey])
		if perr != nil {
			// A broken policy exports nothing rather than something unintended.
			problems = append(problems, fmt.Sprintf("export policy ConfigMap %s/%s refused, nothing is exported: %v", k.cfg.Namespace, ExportPolicyConfigMap, perr))
		} else {
			policy = p
		}
	}
	keys, _ := exportsList()
	var exports []Export
	for _, key := range keys {
		svc, err := service(key.Namespace, key.Name)
		if err != nil {
			problems = append(problems, fmt.Sprintf("ServiceExport %s: no Service %s: not exported", key, key))
			continue
		}
		consumers := policy.Consumers(key.Namespace)
		if len(consumers) == 0 {
			problems = append(problems, fmt.Sprintf("ServiceExport %s: no export rule names namespace %s: not exported", key, key.Namespace))
			continue
		}
		var ports []CatalogPort
		for _, p := range svc.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			ports = append(ports, CatalogPort{Name: p.Name, Port: uint16(p.Port), Protocol: portProtocol(p)})
		}
		if len(ports) == 0 {
			problems = append(problems, fmt.Sprintf("ServiceExport %s: the Service has no TCP port: not exported", key))
			continue
		}
		exports = append(exports, Export{Key: key, Ports: ports, Consumers: consumers, Identities: k.identities(svc, podsOf)})
	}
	slices.SortFunc(exports, func(a, b Export) int { return strings.Compare(a.Key.String(), b.Key.String()) })
	k.mu.Lock()
	same := slices.EqualFunc(k.exports, exports, func(a, b Export) bool {
		return a.Key == b.Key && slices.Equal(a.Ports, b.Ports) && slices.Equal(a.Consumers, b.Consumers) && slices.Equal(a.Identities, b.Identities)
	})
	k.exports, k.problems = exports, problems
	k.mu.Unlock()
	if !same {
		k.cfg.Log.Info("exports changed", "exports", len(exports), "problems", len(problems))
		poke(k.changed)
		if k.cfg.OnChange != nil {
			k.cfg.OnChange(slices.Clone(exports))
		}
	}
}

// identities returns the service accounts of the pods svc selects that may serve (not
// finished), as identities of this mesh's trust domain, sorted; none without a trust
// domain or a selector.
func (k *KubeExports) identities(svc *corev1.Service, podsOf func(ns string, sel labels.Selector) ([]*corev1.Pod, error)) []mesh.Identity {
	if k.cfg.TrustDomain == "" || len(svc.Spec.Selector) == 0 || podsOf == nil {
		return nil
	}
	pods, err := podsOf(svc.Namespace, labels.SelectorFromSet(svc.Spec.Selector))
	if err != nil {
		return nil
	}
	var out []mesh.Identity
	for _, p := range pods {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed || p.DeletionTimestamp != nil {
			continue
		}
		sa := p.Spec.ServiceAccountName
		if sa == "" {
			sa = "default"
		}
		id, err := mesh.NewIdentity(k.cfg.TrustDomain, p.Namespace, sa)
		if err != nil {
			continue
		}
		if !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	slices.SortFunc(out, func(a, b mesh.Identity) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// ParseExportPolicy decodes and validates a policy (strict JSON).
func ParseExportPolicy(s string) (ExportPolicy, error) {
	var p ExportPolicy
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return ExportPolicy{}, fmt.Errorf("federation: export policy: %w", err)
	}
	if dec.More() {
		return ExportPolicy{}, errors.New("federation: export policy: data after the JSON object")
	}
	return p, p.Validate()
}

// portProtocol follows Istio: appProtocol, else the port name's prefix.
func portProtocol(p corev1.ServicePort) mesh.Protocol {
	s := p.Name
	if p.AppProtocol != nil {
		s = *p.AppProtocol
	}
	prefix, _, _ := strings.Cut(strings.ToLower(s), "-")
	switch prefix {
	case "grpc", "grpc-web":
		return mesh.ProtocolGRPC
	case "http":
		return mesh.ProtocolHTTP
	case "http2", "kubernetes.io/h2c":
		return mesh.ProtocolHTTP2
	case "tls", "https":
		return mesh.ProtocolTLS
	case "tcp":
		return mesh.ProtocolTCP
	}
	return mesh.ProtocolUnknown
}
