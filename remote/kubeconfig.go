package remote

import (
	"errors"
	"fmt"
	"net/url"
	"sort"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Policy says which risky kubeconfig features a primary accepts from a remote secret. The
// zero value accepts none of them, which is what a control plane reading secrets that
// anyone with write access to its namespace can create should do.
type Policy struct {
	// AllowExec accepts users with an exec credential plugin (runs a command on the
	// primary's host).
	AllowExec bool
	// AllowAuthProvider accepts users with a legacy auth-provider plugin.
	AllowAuthProvider bool
	// AllowFiles accepts references to files on the primary's host (certificate-authority,
	// client-certificate, client-key, tokenFile).
	AllowFiles bool
	// AllowInsecure accepts insecure-skip-tls-verify and http:// servers.
	AllowInsecure bool
}

// ErrForbiddenKubeconfig is wrapped by every refusal that a Policy could lift.
var ErrForbiddenKubeconfig = errors.New("kubeconfig uses a feature the policy forbids")

// ParseKubeconfig parses data as a kubeconfig, checks it against policy, and returns the
// client configuration of its current context (or of its only context when none is
// current). Every user and cluster entry is checked, not just the selected one, so a
// secret cannot hide a plugin in an entry that becomes current later.
func ParseKubeconfig(data []byte, policy Policy) (*rest.Config, error) {
	if len(strings.TrimSpace(string(data))) == 0 {
		return nil, errors.New("kubeconfig is empty")
	}
	cfg, err := clientcmd.Load(data)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig does not parse: %w", err)
	}
	if err := checkPolicy(cfg, policy); err != nil {
		return nil, err
	}
	ctxName := cfg.CurrentContext
	if ctxName == "" {
		if len(cfg.Contexts) != 1 {
			return nil, fmt.Errorf("kubeconfig has no current-context and %d contexts; set current-context", len(cfg.Contexts))
		}
		for name := range cfg.Contexts {
			ctxName = name
		}
	}
	kctx, ok := cfg.Contexts[ctxName]
	if !ok {
		return nil, fmt.Errorf("kubeconfig current-context %q is not among its contexts", ctxName)
	}
	cluster, ok := cfg.Clusters[kctx.Cluster]
	if !ok {
		return nil, fmt.Errorf("kubeconfig context %q names cluster %q, which is not defined", ctxName, kctx.Cluster)
	}
	if _, ok := cfg.AuthInfos[kctx.AuthInfo]; !ok && kctx.AuthInfo != "" {
		return nil, fmt.Errorf("kubeconfig context %q names user %q, which is not defined", ctxName, kctx.AuthInfo)
	}
	u, err := url.Parse(cluster.Server)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return nil, fmt.Errorf("kubeconfig cluster %q: server %q is not an http(s) URL", kctx.Cluster, cluster.Server)
	}
	// Only the server that will be dialled is checked for plain http; checkPolicy already
	// refused anything risky in the other entries.
	if u.Scheme == "http" && !policy.AllowInsecure {
		return nil, fmt.Errorf("kubeconfig cluster %q: plain-http server %q: %w", kctx.Cluster, cluster.Server, ErrForbiddenKubeconfig)
	}
	rc, err := clientcmd.NewNonInteractiveClientConfig(*cfg, ctxName, &clientcmd.ConfigOverrides{}, nil).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig context %q: %w", ctxName, err)
	}
	return rc, nil
}

// checkPolicy checks every user and cluster entry against p and reports all problems in
// one error wrapping ErrForbiddenKubeconfig, sorted so that the message is the same on
// every read of the same secret (map order would shuffle it). Nil entries are skipped.
func checkPolicy(cfg *clientcmdapi.Config, p Policy) error {
	var problems []string
	for _, name := range sortedKeys(cfg.AuthInfos) {
		a := cfg.AuthInfos[name]
		if a == nil {
			continue
		}
		if a.Exec != nil && !p.AllowExec {
			problems = append(problems, fmt.Sprintf("user %q uses an exec plugin (%q)", name, a.Exec.Command))
		}
		if a.AuthProvider != nil && !p.AllowAuthProvider {
			problems = append(problems, fmt.Sprintf("user %q uses auth-provider %q", name, a.AuthProvider.Name))
		}
		if !p.AllowFiles {
			for field, path := range map[string]string{"client-certificate": a.ClientCertificate, "client-key": a.ClientKey, "tokenFile": a.TokenFile} {
				if path != "" {
					problems = append(problems, fmt.Sprintf("user %q reads %s from file %q", name, field, path))
				}
			}
		}
	}
	for _, name := range sortedKeys(cfg.Clusters) {
		c := cfg.Clusters[name]
		if c == nil {
			continue
		}
		if c.CertificateAuthority != "" && !p.AllowFiles {
			problems = append(problems, fmt.Sprintf("cluster %q reads certificate-authority from file %q", name, c.CertificateAuthority))
		}
		if c.InsecureSkipTLSVerify && !p.AllowInsecure {
			problems = append(problems, fmt.Sprintf("cluster %q sets insecure-skip-tls-verify", name))
		}
	}
	if len(problems) == 0 {
		return nil
	}
	sort.Strings(problems)
	return fmt.Errorf("%w: %s (embed credentials inline, e.g. with `isthmus remote-secret create`, or allow it in the primary's kubeconfig policy)",
		ErrForbiddenKubeconfig, strings.Join(problems, "; "))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
