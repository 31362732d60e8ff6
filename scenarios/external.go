package scenarios

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
)

// External control plane: the control plane runs outside every mesh cluster, as its own
// process, and reads the mesh from a config cluster through a credential made by
// `isthmus remote-secret create --type config` (what reading mesh config needs, no more).
// It discovers the other mesh clusters through the remote secrets in the config
// cluster's system namespace and serves all of them on its secure port; their workloads
// are remote to it (role remote, primary: the config cluster).

// configCredential makes cluster's config credential and writes its kubeconfig where the
// external control plane reads it.
func (r *Run) configCredential(ctx context.Context, cluster string) (string, error) {
	var c *Cluster
	for _, x := range r.Env.Clusters() {
		if x.Name == cluster {
			c = x
		}
	}
	if c == nil {
		return "", fmt.Errorf("scenarios: no cluster %q", cluster)
	}
	created, err := remote.Create(ctx, c.Client, c.REST, remote.CreateOptions{Cluster: mesh.ClusterID(cluster), Type: remote.TypeConfig, ServiceAccount: "isthmus-external"})
	if err != nil {
		return "", fmt.Errorf("scenarios: config credential for %s: %w", cluster, err)
	}
	path := filepath.Join(r.Dir, "trust", "external-"+cluster+".kubeconfig")
	if err := os.WriteFile(path, []byte(created.Secret.StringData[cluster]), 0o600); err != nil {
		return "", err
	}
	r.ExternalCredentials[cluster] = path
	return path, nil
}
