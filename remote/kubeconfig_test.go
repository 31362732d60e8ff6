package remote

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// kubeconfig returns a valid inline kubeconfig, changed by mutate.
func kubeconfig(t testing.TB, mutate func(*clientcmdapi.Config)) []byte {
	t.Helper()
	c := clientcmdapi.NewConfig()
	c.Clusters["c"] = &clientcmdapi.Cluster{Server: "https://10.0.0.1:6443", CertificateAuthorityData: []byte("not-checked-here")}
	c.AuthInfos["u"] = &clientcmdapi.AuthInfo{Token: "t0ken"}
	c.Contexts["ctx"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	c.CurrentContext = "ctx"
	if mutate != nil {
		mutate(c)
	}
	data, err := clientcmd.Write(*c)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestParseKubeconfig(t *testing.T) {
	tests := []struct {
		name      string
		data      []byte
		policy    Policy
		wantErr   string
		forbidden bool // the error must wrap ErrForbiddenKubeconfig
	}{
		{name: "inline token", data: kubeconfig(t, nil)},
		{name: "exec plugin", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.AuthInfos["u"] = &clientcmdapi.AuthInfo{Exec: &clientcmdapi.ExecConfig{Command: "aws", APIVersion: "client.authentication.k8s.io/v1"}}
		}), wantErr: `user "u" uses an exec plugin ("aws")`, forbidden: true},
		{name: "exec plugin allowed", policy: Policy{AllowExec: true}, data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.AuthInfos["u"] = &clientcmdapi.AuthInfo{Exec: &clientcmdapi.ExecConfig{Command: "aws", APIVersion: "client.authentication.k8s.io/v1", InteractiveMode: clientcmdapi.NeverExecInteractiveMode}}
		})},
		{name: "exec hidden in an unused user", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.AuthInfos["other"] = &clientcmdapi.AuthInfo{Exec: &clientcmdapi.ExecConfig{Command: "sh"}}
		}), wantErr: `user "other" uses an exec plugin`, forbidden: true},
		{name: "auth provider", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.AuthInfos["u"] = &clientcmdapi.AuthInfo{AuthProvider: &clientcmdapi.AuthProviderConfig{Name: "gcp"}}
		}), wantErr: `auth-provider "gcp"`, forbidden: true},
		{name: "token file", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.AuthInfos["u"].TokenFile = "/etc/shadow" }),
			wantErr: `reads tokenFile from file "/etc/shadow"`, forbidden: true},
		{name: "client cert file", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.AuthInfos["u"] = &clientcmdapi.AuthInfo{ClientCertificate: "/x.crt", ClientKey: "/x.key"}
		}), wantErr: `reads client-certificate from file "/x.crt"`, forbidden: true},
		{name: "CA file", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.Clusters["c"].CertificateAuthorityData = nil
			c.Clusters["c"].CertificateAuthority = "/ca.crt"
		}), wantErr: `reads certificate-authority from file "/ca.crt"`, forbidden: true},
		{name: "insecure skip verify", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.Clusters["c"].CertificateAuthorityData = nil
			c.Clusters["c"].InsecureSkipTLSVerify = true
		}), wantErr: "insecure-skip-tls-verify", forbidden: true},
		{name: "plain http", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.Clusters["c"].Server = "http://10.0.0.1:8080" }),
			wantErr: "plain-http", forbidden: true},
		{name: "empty", data: []byte("  \n"), wantErr: "empty"},
		{name: "not yaml", data: []byte("{{{{"), wantErr: "does not parse"},
		{name: "no server", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.Clusters["c"].Server = "" }), wantErr: "not an http(s) URL"},
		{name: "dangling context", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.CurrentContext = "nope" }), wantErr: `"nope" is not among`},
		{name: "missing cluster", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.Contexts["ctx"].Cluster = "gone" }), wantErr: `cluster "gone", which is not defined`},
		{name: "only context used when none is current", data: kubeconfig(t, func(c *clientcmdapi.Config) { c.CurrentContext = "" })},
		{name: "ambiguous without current context", data: kubeconfig(t, func(c *clientcmdapi.Config) {
			c.CurrentContext = ""
			c.Contexts["ctx2"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
		}), wantErr: "no current-context and 2 contexts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc, err := ParseKubeconfig(tt.data, tt.policy)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if rc.Host != "https://10.0.0.1:6443" {
					t.Fatalf("host %q", rc.Host)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v; want it to contain %q", err, tt.wantErr)
			}
			if errors.Is(err, ErrForbiddenKubeconfig) != tt.forbidden {
				t.Fatalf("errors.Is(ErrForbiddenKubeconfig) = %v, want %v", !tt.forbidden, tt.forbidden)
			}
		})
	}
}

func TestParseSecret(t *testing.T) {
	good := kubeconfig(t, nil)
	bad := kubeconfig(t, func(c *clientcmdapi.Config) { c.AuthInfos["u"].Exec = &clientcmdapi.ExecConfig{Command: "x"} })
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: "istio-remote-secret-c2", Labels: map[string]string{MultiClusterLabel: "true"}},
		Data:       map[string][]byte{"c2": good, "c3": bad, "bad key!": good},
		StringData: map[string]string{"c4": string(good)},
	}
	creds, err := ParseSecret(s, Policy{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Credential{}
	for _, c := range creds {
		got[c.Key] = c
	}
	if len(creds) != 4 || creds[0].Key != "bad key!" {
		t.Fatalf("want 4 sorted credentials, got %+v", creds)
	}
	if c := got["c2"]; c.Err != nil || c.Cluster != "c2" || c.Config == nil || c.Secret != "istio-system/istio-remote-secret-c2" {
		t.Fatalf("c2: %+v", c)
	}
	if c := got["c4"]; c.Err != nil || c.Config == nil {
		t.Fatalf("stringData entry: %+v", c)
	}
	if c := got["c3"]; c.Err == nil || !errors.Is(c.Err, ErrForbiddenKubeconfig) || !strings.Contains(c.Err.Error(), "cluster c3") {
		t.Fatalf("c3 should be refused by policy, naming the cluster: %v", c.Err)
	}
	if c := got["bad key!"]; c.Err == nil || !strings.Contains(c.Err.Error(), "not a cluster ID") {
		t.Fatalf("invalid key: %v", c.Err)
	}
	if _, err := ParseSecret(&corev1.Secret{}, Policy{}); err == nil {
		t.Fatal("a secret without the label was accepted")
	}
}

func TestNewSecretIsIstioFormat(t *testing.T) {
	s := NewSecret("istio-system", "cluster-2", []byte("kc"))
	if s.Name != "istio-remote-secret-cluster-2" || s.Labels["istio/multiCluster"] != "true" ||
		s.Annotations["networking.istio.io/cluster"] != "cluster-2" || s.StringData["cluster-2"] != "kc" {
		t.Fatalf("not in the istioctl format: %+v", s)
	}
}

// FuzzParseKubeconfig checks that arbitrary bytes never panic the parser and that whatever
// it accepts under the strict policy uses no plugin or file.
func FuzzParseKubeconfig(f *testing.F) {
	f.Add(kubeconfig(f, nil))
	f.Add(kubeconfig(f, func(c *clientcmdapi.Config) { c.AuthInfos["u"].Exec = &clientcmdapi.ExecConfig{Command: "x"} }))
	f.Add([]byte("apiVersion: v1\nkind: Config\nclusters: [{name: a, cluster: {server: 'https://x'}}]"))
	f.Add([]byte("{}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rc, err := ParseKubeconfig(data, Policy{})
		if err != nil {
			return
		}
		if rc.ExecProvider != nil || rc.AuthProvider != nil || rc.BearerTokenFile != "" || rc.CAFile != "" || rc.CertFile != "" || rc.KeyFile != "" || rc.Insecure {
			t.Fatalf("strict policy accepted a risky kubeconfig: %+v", rc)
		}
	})
}
