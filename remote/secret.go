package remote

import (
	"fmt"
	"sort"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// The Istio remote-secret format, described field by field in docs/remote.md; secrets
// written by istioctl use the same names, so either tool reads the other's. Only the label
// selects a secret: the annotation and the name prefix are written for istioctl and for
// operators, and the data keys name the clusters.
const (
	// MultiClusterLabel marks a Secret as a remote secret when set to "true".
	MultiClusterLabel = "istio/multiCluster"
	// ClusterAnnotation names the cluster the secret gives access to.
	ClusterAnnotation = "networking.istio.io/cluster"
	// SecretNamePrefix starts the name of every remote secret istioctl and Isthmus write.
	SecretNamePrefix = "istio-remote-secret-"
)

// Credential is one cluster's entry of a remote secret.
type Credential struct {
	// Key is the data key as written; Cluster is it parsed (empty when it is invalid).
	Key     string
	Cluster mesh.ClusterID
	// Secret is "namespace/name" of the secret the entry came from.
	Secret string
	// Kubeconfig is the raw kubeconfig.
	Kubeconfig []byte
	// Config is the parsed client configuration; nil when Err is set.
	Config *rest.Config
	// Err says why this entry cannot be used; other entries of the secret are unaffected.
	Err error
}

// IsRemoteSecret reports whether s carries the remote-secret label.
func IsRemoteSecret(s *corev1.Secret) bool {
	return s != nil && s.Labels[MultiClusterLabel] == "true"
}

// ParseSecret returns one Credential per data key of a remote secret, sorted by key. A key
// that is not a valid cluster ID, or a kubeconfig that does not parse or breaks policy,
// gives a Credential with Err set, so that a caller can report it per cluster while using
// the valid ones. It fails as a whole only for a Secret that is not a remote secret.
func ParseSecret(s *corev1.Secret, policy Policy) ([]Credential, error) {
	if !IsRemoteSecret(s) {
		return nil, fmt.Errorf("remote: secret is not a remote secret (label %s=true missing)", MultiClusterLabel)
	}
	ref := s.Namespace + "/" + s.Name
	data := make(map[string][]byte, len(s.Data)+len(s.StringData))
	for k, v := range s.Data {
		data[k] = v
	}
	for k, v := range s.StringData { // as the API server would merge them
		data[k] = []byte(v)
	}
	keys := make([]string, 0, len(data))
	for k := range data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	creds := make([]Credential, 0, len(keys))
	for _, k := range keys {
		c := Credential{Key: k, Secret: ref, Kubeconfig: data[k]}
		id, err := mesh.ParseClusterID(k)
		if err != nil {
			c.Err = fmt.Errorf("remote: secret %s: data key is not a cluster ID: %w", ref, err)
			creds = append(creds, c)
			continue
		}
		c.Cluster = id
		c.Config, err = ParseKubeconfig(data[k], policy)
		if err != nil {
			c.Err = fmt.Errorf("remote: secret %s, cluster %s: %w", ref, id, err)
		}
		creds = append(creds, c)
	}
	return creds, nil
}

// NewSecret builds a remote secret for cluster with the given kubeconfig, in the format
// istioctl writes (stringData, so that it stays readable as YAML).
func NewSecret(namespace string, cluster mesh.ClusterID, kubeconfig []byte) *corev1.Secret {
	return &corev1.Secret{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Secret"},
		ObjectMeta: metav1.ObjectMeta{
			Name:        SecretNamePrefix + string(cluster),
			Namespace:   namespace,
			Labels:      map[string]string{MultiClusterLabel: "true"},
			Annotations: map[string]string{ClusterAnnotation: string(cluster)},
		},
		StringData: map[string]string{string(cluster): string(kubeconfig)},
	}
}
