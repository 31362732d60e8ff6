package federation

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	mcsv1a1 "sigs.k8s.io/mcs-api/pkg/apis/v1alpha1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// LabelPeer marks the ServiceImports KubeImports owns, with the exporting mesh's ID.
const LabelPeer = "federation.isthmus.io/peer"

// AnnotationHostname on a ServiceImport is the name the service is reached by.
const AnnotationHostname = "federation.isthmus.io/hostname"

// ServiceImportName is the ServiceImport that stands for service key of peer mesh
// peer: "<name>.<peer>" in the service's namespace, so that `kubectl get serviceimports`
// shows one object per import and two peers' echo never share one.
func ServiceImportName(peer mesh.MeshID, key mesh.ServiceKey) string {
	return key.Name + "." + string(peer)
}

// KubeImports is an ImportSink that keeps ServiceImport objects (MCS) equal to the
// imports in the importing cluster. ReplaceImports only records the wish (it is called
// with the Endpoint's lock held); Run applies it.
type KubeImports struct {
	mcs  mcsclient.Interface
	log  *slog.Logger
	kick chan struct{}

	mu sync.Mutex
	// want is the desired imports by peer; problems why some cannot be written; both
	// guarded by mu.
	want     map[mesh.MeshID][]ImportedService
	problems []string
}

// NewKubeImports returns a sink writing through mcs.
func NewKubeImports(mcs mcsclient.Interface, log *slog.Logger) *KubeImports {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &KubeImports{mcs: mcs, log: log, kick: make(chan struct{}, 1), want: map[mesh.MeshID][]ImportedService{}}
}

// ReplaceImports implements ImportSink.
func (k *KubeImports) ReplaceImports(peer mesh.MeshID, services []ImportedService) {
	k.mu.Lock()
	if len(services) == 0 {
		delete(k.want, peer)
	} else {
		k.want[peer] = slices.Clone(services)
	}
	k.mu.Unlock()
	poke(k.kick)
}

// Problems returns why some imports have no ServiceImport (for example, no such
// namespace in this cluster).
func (k *KubeImports) Problems() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.problems)
}

// Run applies the wished set until ctx ends, retrying every 2 s after an error.
func (k *KubeImports) Run(ctx context.Context) error {
	retry := time.NewTicker(2 * time.Second)
	defer retry.Stop()
	for {
		k.sync(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-k.kick:
		case <-retry.C:
		}
	}
}

func (k *KubeImports) sync(ctx context.Context) {
	k.mu.Lock()
	want := map[string]*mcsv1a1.ServiceImport{}
	for peer, svcs := range k.want {
		for _, s := range svcs {
			si := &mcsv1a1.ServiceImport{ObjectMeta: metav1.ObjectMeta{Name: ServiceImportName(peer, s.Key), Namespace: s.Key.Namespace,
				Labels: map[string]string{LabelPeer: string(peer)}, Annotations: map[string]string{AnnotationHostname: string(s.Hostname)}},
				Spec: mcsv1a1.ServiceImportSpec{Type: mcsv1a1.ClusterSetIP}}
			for _, p := range s.Ports {
				sp := mcsv1a1.ServicePort{Name: p.Name, Port: int32(p.Port), Protocol: corev1.ProtocolTCP}
				if p.Protocol != mesh.ProtocolUnknown {
					ap := strings.ToLower(string(p.Protocol))
					sp.AppProtocol = &ap
				}
				si.Spec.Ports = append(si.Spec.Ports, sp)
			}
			want[si.Namespace+"/"+si.Name] = si
		}
	}
	k.mu.Unlock()
	var problems []string
	have, err := k.mcs.MulticlusterV1alpha1().ServiceImports("").List(ctx, metav1.ListOptions{LabelSelector: LabelPeer})
	if err != nil {
		k.setProblems([]string{fmt.Sprintf("list ServiceImports: %v", err)})
		return
	}
	for i := range have.Items {
		cur := &have.Items[i]
		w, ok := want[cur.Namespace+"/"+cur.Name]
		if !ok {
			if err := k.mcs.MulticlusterV1alpha1().ServiceImports(cur.Namespace).Delete(ctx, cur.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				problems = append(problems, fmt.Sprintf("delete ServiceImport %s/%s: %v", cur.Namespace, cur.Name, err))
			}
			continue
		}
		delete(want, cur.Namespace+"/"+cur.Name)
		if slices.EqualFunc(cur.Spec.Ports, w.Spec.Ports, portEqual) && cur.Annotations[AnnotationHostname] == w.Annotations[AnnotationHostname] {
			continue
		}
		cur.Spec.Ports, cur.Spec.Type = w.Spec.Ports, w.Spec.Type
		if cur.Annotations == nil {
			cur.Annotations = map[string]string{}
		}
		cur.Annotations[AnnotationHostname] = w.Annotations[AnnotationHostname]
		if _, err := k.mcs.MulticlusterV1alpha1().ServiceImports(cur.Namespace).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			problems = append(problems, fmt.Sprintf("update ServiceImport %s/%s: %v", cur.Namespace, cur.Name, err))
		}
	}
	for _, w := range want {
		_, err := k.mcs.MulticlusterV1alpha1().ServiceImports(w.Namespace).Create(ctx, w, metav1.CreateOptions{})
		switch {
		case err == nil:
		case apierrors.IsNotFound(err):
			problems = append(problems, fmt.Sprintf("ServiceImport %s/%s: namespace %s does not exist in this cluster (the import is served, it has no object)", w.Namespace, w.Name, w.Namespace))
		default:
			problems = append(problems, fmt.Sprintf("create ServiceImport %s/%s: %v", w.Namespace, w.Name, err))
		}
	}
	slices.Sort(problems)
	k.setProblems(problems)
}

func (k *KubeImports) setProblems(p []string) {
	k.mu.Lock()
	changed := !slices.Equal(k.problems, p)
	k.problems = p
	k.mu.Unlock()
	if changed && len(p) > 0 {
		k.log.Warn("ServiceImports not in line with the imports", "problems", strings.Join(p, "; "))
	}
}

func portEqual(a, b mcsv1a1.ServicePort) bool {
	return a.Name == b.Name && a.Port == b.Port && a.Protocol == b.Protocol &&
		(a.AppProtocol == nil) == (b.AppProtocol == nil) && (a.AppProtocol == nil || *a.AppProtocol == *b.AppProtocol)
}
