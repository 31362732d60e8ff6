package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/remote"
	"github.com/isthmus-mesh/isthmus/trust"
)

// installFixtures writes a plug-in CA directory, a remote secret and a config credential
// for the install tests, and returns their paths.
func installFixtures(t *testing.T) (caDir, secretFile, credFile string) {
	t.Helper()
	dir := t.TempDir()
	root, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	in, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: "cluster-1"})
	if err != nil {
		t.Fatal(err)
	}
	caDir = filepath.Join(dir, "ca")
	if err := in.WriteDir(caDir); err != nil {
		t.Fatal(err)
	}
	kubeconfig := []byte("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://192.0.2.10:6443', certificate-authority-data: TFMwdA==}\n" +
		"users:\n- name: c\n  user: {token: t}\ncontexts:\n- name: c\n  context: {cluster: c, user: c}\ncurrent-context: c\n")
	write := func(name string, v any) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	secretFile = write("cluster-2.yaml", remote.NewSecret("istio-system", "cluster-2", kubeconfig))
	cred := remote.NewSecret("istio-system", mesh.ClusterID("cluster-1"), kubeconfig)
	delete(cred.Labels, remote.MultiClusterLabel)
	credFile = write("config.yaml", cred)
	return caDir, secretFile, credFile
}

// installModels are the install flags of one cluster of every model in every role.
func installModels(caDir, secretFile, credFile string) map[string][]string {
	cp := []string{"--control-plane-cluster", "cluster-1", "--control-plane-address", "192.0.2.20:15012"}
	return map[string][]string{
		"single-cluster/primary":         {"--model", "single-cluster", "--role", "primary", "--cluster-id", "cluster-1", "--ca-dir", caDir},
		"multi-primary/primary":          {"--model", "multi-primary", "--role", "primary", "--cluster-id", "cluster-1", "--ca-dir", caDir, "--remote-secret", secretFile},
		"multi-network/primary":          {"--model", "multi-network", "--role", "primary", "--cluster-id", "cluster-1", "--network", "network-1", "--ca-dir", caDir, "--remote-secret", secretFile, "--gateway-service-type", "NodePort"},
		"multi-network/gateway":          append([]string{"--model", "multi-network", "--role", "gateway", "--cluster-id", "cluster-3", "--network", "network-3", "--ca-dir", caDir}, cp...),
		"primary-remote/primary":         {"--model", "primary-remote", "--role", "primary", "--cluster-id", "cluster-1", "--network", "network-1", "--ca-dir", caDir, "--remote-secret", secretFile},
		"primary-remote/remote":          append([]string{"--model", "primary-remote", "--role", "remote", "--cluster-id", "cluster-2", "--network", "network-2", "--ca-dir", caDir}, cp...),
		"external-control-plane/primary": {"--model", "external-control-plane", "--role", "primary", "--cluster-id", "cp-host", "--ca-dir", caDir, "--config-credential", credFile},
		"external-control-plane/config":  {"--model", "external-control-plane", "--role", "config", "--cluster-id", "cluster-1", "--network", "network-1", "--ca-dir", caDir, "--remote-secret", secretFile, "--control-plane-address", "192.0.2.30:15012"},
		"external-control-plane/remote":  append([]string{"--model", "external-control-plane", "--role", "remote", "--cluster-id", "cluster-2", "--network", "network-2", "--ca-dir", caDir}, cp...),
	}
}

// objectList lists the objects of the kinds an installation touches, directly or
// through the controllers, as sorted "resource namespace/name" strings.
func objectList(t *testing.T, dc dynamic.Interface) []string {
	t.Helper()
	var out []string
	for _, gvr := range []schema.GroupVersionResource{
		{Version: "v1", Resource: "namespaces"}, {Version: "v1", Resource: "serviceaccounts"}, {Version: "v1", Resource: "secrets"},
		{Version: "v1", Resource: "configmaps"}, {Version: "v1", Resource: "services"}, {Version: "v1", Resource: "pods"},
		{Group: "discovery.k8s.io", Version: "v1", Resource: "endpointslices"}, {Group: "apps", Version: "v1", Resource: "deployments"},
		{Group: "apps", Version: "v1", Resource: "replicasets"},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterroles"}, {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "clusterrolebindings"},
		{Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "roles"}, {Group: "rbac.authorization.k8s.io", Version: "v1", Resource: "rolebindings"},
		{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"},
	} {
		l, err := dc.Resource(gvr).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range l.Items {
			out = append(out, gvr.Resource+" "+o.GetNamespace()+"/"+o.GetName())
		}
	}
	sort.Strings(out)
	return out
}

// TestInstallCommands runs, on a real cluster and for every model and role: `install
// --dry-run -o yaml` (json for one) applied with `kubectl apply --server-side`, then
// `install` twice (the second changes no resourceVersion), then `uninstall`, after which
// the cluster has exactly the objects it had before.
func TestInstallCommands(t *testing.T) {
	c := kubetest.Start(t, 1)[0]
	set, err := kubetest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	dc, err := dynamic.NewForConfig(c.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	// A fresh cluster's controllers are still filling the system namespaces (default
	// service accounts, kube-root-ca.crt); the first snapshot must not race them.
	cs, err := c.Client()
	if err != nil {
		t.Fatal(err)
	}
	kubetest.Eventually(t, time.Minute, "the system namespaces' default service accounts and root CA ConfigMaps", func() error {
		for _, ns := range []string{"default", "kube-system", "kube-public", "kube-node-lease"} {
			if _, err := cs.CoreV1().ServiceAccounts(ns).Get(context.Background(), "default", metav1.GetOptions{}); err != nil {
				return err
			}
			if _, err := cs.CoreV1().ConfigMaps(ns).Get(context.Background(), "kube-root-ca.crt", metav1.GetOptions{}); err != nil {
				return err
			}
		}
		return nil
	})
	caDir, secretFile, credFile := installFixtures(t)
	for name, args := range installModels(caDir, secretFile, credFile) {
		t.Run(strings.ReplaceAll(name, "/", "-"), func(t *testing.T) {
			before := objectList(t, dc)
			t.Cleanup(func() {
				if t.Failed() { // leave the cluster clean for the next case
					runRoot(t, "uninstall", "--kubeconfig", c.Kubeconfig, "--timeout", "2m")
				}
			})
			format := "yaml"
			if name == "multi-network/primary" {
				format = "json"
			}
			out, _, err := runRoot(t, append([]string{"install", "--dry-run", "-o", format}, args...)...)
			if err != nil {
				t.Fatalf("install --dry-run: %v", err)
			}
			file := filepath.Join(t.TempDir(), "objects."+format)
			if err := os.WriteFile(file, []byte(out), 0o600); err != nil {
				t.Fatal(err)
			}
			kc := exec.Command(set.Kubectl, "--kubeconfig", c.Kubeconfig, "apply", "--server-side", "-f", file)
			if b, err := kc.CombinedOutput(); err != nil {
				t.Fatalf("kubectl apply --server-side of the dry-run output: %v\n%s", err, b)
			}

			install := append([]string{"install", "--kubeconfig", c.Kubeconfig, "--wait=false", "-o", "json"}, args...)
			if _, stderr, err := runRoot(t, install...); err != nil {
				t.Fatalf("install: %v\n%s", err, stderr)
			} else if !strings.Contains(stderr, "not waiting for rollouts (--wait=false)") {
				t.Errorf("install --wait=false does not say it is not waiting:\n%s", stderr)
			}
			// Let the controllers settle (rollouts, EndpointSlices) before comparing.
			if _, stderr, err := runRoot(t, append([]string{"install", "--kubeconfig", c.Kubeconfig, "--timeout", "2m"}, args...)...); err != nil {
				t.Fatalf("install (waiting): %v\n%s", err, stderr)
			}
			rv := func() map[string]string {
				m := map[string]string{}
				out, _, err := runRoot(t, append([]string{"install", "--dry-run", "-o", "yaml"}, args...)...)
				if err != nil {
					t.Fatal(err)
				}
				for _, doc := range strings.Split(out, "\n---\n") {
					var o struct {
						APIVersion, Kind string
						Metadata         struct{ Name, Namespace string }
					}
					if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
						t.Fatal(err)
					}
					gv, _ := schema.ParseGroupVersion(o.APIVersion)
					res := strings.ToLower(o.Kind) + "s"
					if o.Kind == "EndpointSlice" {
						res = "endpointslices"
					}
					got, err := dc.Resource(gv.WithResource(res)).Namespace(o.Metadata.Namespace).Get(context.Background(), o.Metadata.Name, metav1.GetOptions{})
					if err != nil {
						t.Fatalf("%s %s: %v", o.Kind, o.Metadata.Name, err)
					}
					m[o.Kind+" "+o.Metadata.Namespace+"/"+o.Metadata.Name] = got.GetResourceVersion()
				}
				return m
			}
			first := rv()
			var res deploy.Result
			out, stderr, err := runRoot(t, append([]string{"install", "--kubeconfig", c.Kubeconfig, "--timeout", "2m", "-o", "yaml"}, args...)...)
			if err != nil {
				t.Fatalf("second install: %v\n%s", err, stderr)
			}
			if err := yaml.Unmarshal([]byte(out), &res); err != nil || len(res.Applied) != len(first) || len(res.Pruned) != 0 {
				t.Errorf("second install result: %v %+v", err, res)
			}
			if d := cmp.Diff(first, rv()); d != "" {
				t.Errorf("the second install changed objects (-first +second resourceVersion):\n%s", d)
			}

			out, stderr, err = runRoot(t, "uninstall", "--kubeconfig", c.Kubeconfig, "--timeout", "2m")
			if err != nil {
				t.Fatalf("uninstall: %v\n%s", err, stderr)
			}
			if !strings.Contains(out, "removed ") {
				t.Errorf("uninstall printed %q", out)
			}
			if d := cmp.Diff(before, objectList(t, dc)); d != "" {
				t.Errorf("uninstall did not leave the cluster as it was (-before +after):\n%s", d)
			}
		})
	}
	if _, _, err := runRoot(t, "uninstall", "--kubeconfig", c.Kubeconfig); err == nil || !strings.Contains(err.Error(), "nothing to remove") {
		t.Errorf("uninstall of nothing: %v", err)
	}
}

// TestInstallBadInput: every mistake is refused before anything is sent, naming the flag,
// the file or the field.
func TestInstallBadInput(t *testing.T) {
	caDir, secretFile, _ := installFixtures(t)
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	primary := []string{"--role", "primary", "--cluster-id", "cluster-1", "--ca-dir", caDir}
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"unknown model", append([]string{"install", "--dry-run", "-o", "yaml", "--model", "mesh-of-meshes"}, primary...),
			`model: unknown model "mesh-of-meshes" (one of external-control-plane, multi-network, multi-primary, primary-remote, single-cluster)`},
		{"role of another model", []string{"install", "--dry-run", "-o", "yaml", "--model", "single-cluster", "--role", "gateway"},
			`role: model single-cluster has no role "gateway" (its roles: primary)`},
		{"malformed values file", []string{"install", "--dry-run", "-o", "yaml", "--values", file("bad.yaml", "model: [single-cluster\n")},
			"--values " + filepath.Join(dir, "bad.yaml") + ": deploy: values:"},
		{"misspelt field", []string{"install", "--dry-run", "-o", "yaml", "--values", file("typo.yaml", "model: single-cluster\nclustrID: c1\n")},
			`unknown field "clustrID"`},
		{"missing values file", []string{"install", "--dry-run", "-o", "yaml", "--values", filepath.Join(dir, "nope.yaml")}, "--values: open"},
		{"bad service type", append([]string{"install", "--dry-run", "-o", "yaml", "--model", "multi-network", "--network", "n1", "--gateway-service-type", "ClusterIP"}, primary...),
			`gateway.serviceType: "ClusterIP": want LoadBalancer or NodePort`},
		{"bad address", []string{"install", "--dry-run", "-o", "yaml", "--model", "primary-remote", "--role", "remote", "--cluster-id", "c2", "--network", "n2", "--ca-dir", caDir,
			"--control-plane-cluster", "c1", "--control-plane-address", "gateway.example:15012"}, `controlPlane.address: "gateway.example:15012": want IP:PORT`},
		{"no CA", []string{"install", "--dry-run", "-o", "yaml", "--model", "single-cluster", "--role", "primary", "--cluster-id", "c1"}, "ca: the primary needs the plug-in CA files"},
		{"remote secret not a secret", append([]string{"install", "--dry-run", "-o", "yaml", "--model", "multi-primary", "--remote-secret", file("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")}, primary...),
			"--remote-secret " + filepath.Join(dir, "cm.yaml") + ": document 0"},
		{"remote secret on a single cluster", append([]string{"install", "--dry-run", "-o", "yaml", "--model", "single-cluster", "--remote-secret", secretFile}, primary...), ""},
		{"dry run without -o", append([]string{"install", "--dry-run", "--model", "single-cluster"}, primary...), "--dry-run prints the objects: use -o yaml or -o json"},
		{"unknown -o", append([]string{"install", "-o", "xml", "--model", "single-cluster"}, primary...), `unknown output format "xml"`},
		{"image without target", []string{"image", "build"}, "-o FILE (a tarball) and/or --push REF"},
		{"image of a script", []string{"image", "build", "--binary", file("script.sh", "#!/bin/sh\n"), "-o", filepath.Join(dir, "x.tar")}, "not an ELF executable"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, _, err := runRoot(t, c.args...)
			if c.want == "" {
				// Allowed: a single cluster's primary may hold remote secrets (it reads
				// them; a second cluster can join later).
				if err != nil {
					t.Fatalf("%v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want it to contain %q", err, c.want)
			}
			if out != "" {
				t.Errorf("printed %q beside the error", out)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "x.tar")); !os.IsNotExist(err) {
		t.Errorf("a failed image build left a file: %v", err)
	}
}

// TestRenderedArgsParse checks every container command line install renders against this
// binary's own command tree: each names a real subcommand, every flag exists and parses,
// and the required flags are there, so a Deployment never crash-loops on a flag typo.
func TestRenderedArgsParse(t *testing.T) {
	caDir, secretFile, credFile := installFixtures(t)
	for name, args := range installModels(caDir, secretFile, credFile) {
		out, _, err := runRoot(t, append([]string{"install", "--dry-run", "-o", "json"}, args...)...)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var list struct {
			Items []struct {
				Kind string
				Spec struct {
					Template struct {
						Spec struct {
							Containers []struct{ Args []string }
						}
					}
				}
			}
		}
		if err := yaml.Unmarshal([]byte(out), &list); err != nil {
			t.Fatal(err)
		}
		for _, item := range list.Items {
			if item.Kind != "Deployment" {
				continue
			}
			for _, c := range item.Spec.Template.Spec.Containers {
				root := newRootCommand()
				cmd, rest, err := root.Find(c.Args)
				if err != nil || cmd == root {
					t.Fatalf("%s: %v names no subcommand: %v", name, c.Args, err)
				}
				if err := cmd.ParseFlags(rest); err != nil {
					t.Errorf("%s: %v: %v", name, c.Args, err)
					continue
				}
				if err := cmd.ValidateRequiredFlags(); err != nil {
					t.Errorf("%s: %v: %v", name, c.Args, err)
				}
				if cmd.Flags().Changed("kubeconfig") != (name == "external-control-plane/primary") {
					t.Errorf("%s: %v: --kubeconfig only for the external control plane (in-cluster credentials otherwise)", name, c.Args)
				}
			}
		}
	}
}
