package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/deploy"
	"github.com/isthmus-mesh/isthmus/trust"
)

// installFlags are the flags of install that set deploy.Values; each overrides the
// values file only when given.
type installFlags struct {
	valuesFile, caDir, configCredential string
	remoteSecrets                       []string
	v                                   deploy.Values
	serviceType                         string
	forwardControlPlane                 bool
	ingress                             bool
	ingressServiceType                  string
}

// values builds deploy.Values from the values file and the flags given on cmd, and reads
// the files they name. It does not validate the values: deploy.Render does, all at once.
func (f *installFlags) values(cmd *cobra.Command) (deploy.Values, error) {
	var v deploy.Values
	if f.valuesFile != "" {
		data, err := os.ReadFile(f.valuesFile)
		if err != nil {
			return v, fmt.Errorf("--values: %w", err)
		}
		if v, err = deploy.ParseValues(data); err != nil {
			return v, fmt.Errorf("--values %s: %w", f.valuesFile, err)
		}
	}
	set := cmd.Flags().Changed
	for flag, apply := range map[string]func(){
		"model":                 func() { v.Model = f.v.Model },
		"role":                  func() { v.Role = f.v.Role },
		"name":                  func() { v.Name = f.v.Name },
		"cluster-id":            func() { v.ClusterID = f.v.ClusterID },
		"network":               func() { v.Network = f.v.Network },
		"namespace":             func() { v.Namespace = f.v.Namespace },
		"trust-domain":          func() { v.TrustDomain = f.v.TrustDomain },
		"image":                 func() { v.Image = f.v.Image },
		"image-pull-policy":     func() { v.ImagePullPolicy = f.v.ImagePullPolicy },
		"control-plane-cluster": func() { v.ControlPlane.Cluster = f.v.ControlPlane.Cluster },
		"control-plane-address": func() { v.ControlPlane.Address = f.v.ControlPlane.Address },
		"gateway-service-type":  func() { v.Gateway.ServiceType = corev1.ServiceType(f.serviceType) },
		"forward-control-plane": func() { v.Gateway.ForwardControlPlane = &f.forwardControlPlane },
		"gateway":               func() { v.Primary.Gateways = f.v.Primary.Gateways },
		"ingress":               func() { v.Ingress.Enabled = f.ingress },
		"ingress-service-type":  func() { v.Ingress.ServiceType = corev1.ServiceType(f.ingressServiceType) },
	} {
		if set(flag) {
			apply()
		}
	}
	if v.Image == "" {
		v.Image = deploy.DefaultImageTag(version)
	}
	if f.caDir != "" {
		v.CA = map[string][]byte{}
		for _, name := range []string{trust.CACertFile, trust.CAKeyFile, trust.RootCertFile, trust.CertChainFile} {
			data, err := os.ReadFile(filepath.Join(f.caDir, name))
			if errors.Is(err, os.ErrNotExist) {
				continue // which files the role needs is Render's to say
			}
			if err != nil {
				return v, fmt.Errorf("--ca-dir: %w", err)
			}
			v.CA[name] = data
		}
	}
	for _, file := range f.remoteSecrets {
		secrets, err := readSecrets(file)
		if err != nil {
			return v, fmt.Errorf("--remote-secret %s: %w", file, err)
		}
		v.RemoteSecrets = append(v.RemoteSecrets, secrets...)
	}
	if f.configCredential != "" {
		secrets, err := readSecrets(f.configCredential)
		if err != nil {
			return v, fmt.Errorf("--config-credential %s: %w", f.configCredential, err)
		}
		if len(secrets) != 1 {
			return v, fmt.Errorf("--config-credential %s: holds %d Secrets, want one", f.configCredential, len(secrets))
		}
		v.ConfigCredential = secrets[0]
	}
	return v, nil
}

// readSecrets reads the Secrets of a YAML (multi-document) or JSON file, strictly: each
// document must be a v1 Secret.
func readSecrets(file string) ([]*corev1.Secret, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var out []*corev1.Secret
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 || string(bytes.TrimSpace(doc)) == "---" {
			continue
		}
		s := &corev1.Secret{}
		if err := yaml.UnmarshalStrict(doc, s); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if s.APIVersion != "v1" || s.Kind != "Secret" {
			return nil, fmt.Errorf("document %d is %s %s, want a v1 Secret", i, s.APIVersion, s.Kind)
		}
		out = append(out, s)
	}
	if len(out) == 0 {
		return nil, errors.New("no Secret in the file")
	}
	return out, nil
}

// newInstallCommand renders a cluster's objects for its role in a deployment model and
// applies them, or prints them with --dry-run.
func newInstallCommand() *cobra.Command {
	var (
		f                       installFlags
		kubeconfig, kubeContext string
		output                  string
		dryRun, wait            bool
		timeout                 time.Duration
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install Isthmus on a cluster for its role in a deployment model (or print it with --dry-run)",
		Long: `Install Isthmus on a cluster: what the cluster needs for its role in a deployment model
(docs/deploy.md): namespace, service accounts, least-privilege RBAC, the primary's and the
east-west gateway's Deployments and Services, the cacerts Secret (--ca-dir), remote secrets
(--remote-secret) and Istio's CRDs.

Objects are sent with server-side apply (field manager isthmus). An inventory ConfigMap
(isthmus-install-<name>) records them, so the next install deletes what it no longer
renders and 'isthmus uninstall' removes exactly what was installed. Running it again with
the same values changes nothing.

--dry-run prints the objects instead (-o yaml, a multi-document stream, or -o json, a
List) for kubectl apply --server-side, Kustomize or a GitOps tool.

Models and roles:
  single-cluster          primary
  multi-primary           primary
  multi-network           primary, gateway
  primary-remote          primary, remote, gateway
  external-control-plane  primary (the control plane's host), config, remote, gateway`,
		Example: `  isthmus trust intermediate --root-dir root --cluster cluster-1 --out-dir cluster-1
  isthmus install --model multi-network --role primary --cluster-id cluster-1 --network network-1 \
      --ca-dir cluster-1 --remote-secret cluster-2-secret.yaml --kubeconfig k1
  isthmus install --values cluster-2.yaml --ca-dir cluster-1 --dry-run -o yaml | kubectl apply --server-side -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case dryRun && output != "yaml" && output != "json":
				return fmt.Errorf("--dry-run prints the objects: use -o yaml or -o json (not %q)", output)
			case !dryRun:
				if err := (printer{format: output}).validate(); err != nil {
					return err
				}
			}
			v, err := f.values(cmd)
			if err != nil {
				return err
			}
			objs, err := deploy.Render(v)
			if err != nil {
				return err
			}
			if dryRun {
				return deploy.Encode(cmd.OutOrStdout(), objs, output)
			}
			dc, err := dynamicClient(kubeconfig, kubeContext)
			if err != nil {
				return err
			}
			progress := cmd.ErrOrStderr()
			if !wait {
				fmt.Fprintln(progress, "not waiting for rollouts (--wait=false): the Deployments are applied, their pods may not be running yet")
			}
			res, err := deploy.Apply(cmd.Context(), deploy.ApplyConfig{Client: dc, Name: v.Name, Namespace: v.Namespace, Wait: wait, Timeout: timeout, Progress: progress}, objs)
			if err != nil {
				return err
			}
			return printer{format: output}.print(cmd.OutOrStdout(), res, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "installed %d object(s) for %s %s in cluster %s, pruned %d, left %d in place\n",
					len(res.Applied), v.Model, v.Role, v.ClusterID, len(res.Pruned), len(res.Released))
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster to install on (default: $KUBECONFIG or ~/.kube/config)")
	fl.StringVar(&kubeContext, "context", "", "context in the kubeconfig to use")
	fl.StringVar(&f.valuesFile, "values", "", "values file (YAML, the fields of docs/deploy.md); flags override it")
	fl.StringVar((*string)(&f.v.Model), "model", "", "deployment model: single-cluster, multi-primary, multi-network, primary-remote, external-control-plane")
	fl.StringVar((*string)(&f.v.Role), "role", "", "this cluster's role in the model: primary, remote, config or gateway")
	fl.StringVar(&f.v.Name, "name", "", "installation name (inventory isthmus-install-<name>; default isthmus)")
	fl.StringVar(&f.v.ClusterID, "cluster-id", "", "this cluster's ID in the mesh")
	fl.StringVar(&f.v.Network, "network", "", "this cluster's network (required by the multi-network models)")
	fl.StringVar(&f.v.Namespace, "namespace", "", "control-plane namespace (default istio-system)")
	fl.StringVar(&f.v.TrustDomain, "trust-domain", "", "trust domain of workload identities (default cluster.local)")
	fl.StringVar(&f.v.Image, "image", "", "the isthmus image (default isthmus:<this version>, what isthmus image build tags)")
	fl.StringVar((*string)(&f.v.ImagePullPolicy), "image-pull-policy", "", "Always, IfNotPresent (default) or Never")
	fl.StringVar(&f.v.ControlPlane.Cluster, "control-plane-cluster", "", "remote role: the cluster whose control plane this one uses")
	fl.StringVar(&f.v.ControlPlane.Address, "control-plane-address", "", "remote, config and gateway roles: IP:PORT of the control plane's secure port as this cluster reaches it")
	fl.StringVar(&f.serviceType, "gateway-service-type", "", "the east-west gateway's Service type: LoadBalancer (default) or NodePort")
	fl.BoolVar(&f.forwardControlPlane, "forward-control-plane", false, "the gateway forwards 15012 to the control plane (default on for the primary of primary-remote and the config cluster)")
	fl.BoolVar(&f.ingress, "ingress", false, "also install an ingress gateway (isthmus proxy --mode ingress, pods labelled istio=ingressgateway) on the primary or remote cluster; needs --network")
	fl.StringVar(&f.ingressServiceType, "ingress-service-type", "", "the ingress gateway's Service type: LoadBalancer (default) or NodePort")
	fl.StringArrayVar(&f.v.Primary.Gateways, "gateway", nil, "primary of a multi-network model: NETWORK=IP:PORT of another network's gateway it cannot discover (one behind a NodePort) (repeatable)")
	fl.StringVar(&f.caDir, "ca-dir", "", "plug-in CA directory (isthmus trust intermediate): all four files for a primary, root-cert.pem for the other roles")
	fl.StringArrayVar(&f.remoteSecrets, "remote-secret", nil, "file of remote secrets (isthmus remote-secret create) to install (repeatable)")
	fl.StringVar(&f.configCredential, "config-credential", "", "external-control-plane primary: the config cluster's credential (isthmus remote-secret create --type config)")
	fl.BoolVar(&dryRun, "dry-run", false, "print the objects (-o yaml or json) instead of applying them")
	fl.StringVarP(&output, "output", "o", "", "yaml or json: the objects with --dry-run, else the result")
	fl.BoolVar(&wait, "wait", true, "wait until the Deployments have rolled out (a cluster without kubelets never runs them: use --wait=false)")
	fl.DurationVar(&timeout, "timeout", 5*time.Minute, "longest each wait may take")
	return cmd
}

// newUninstallCommand removes what install made, as its inventory lists it.
func newUninstallCommand() *cobra.Command {
	var (
		kubeconfig, kubeContext, name, namespace, output string
		wait                                             bool
		timeout                                          time.Duration
	)
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove exactly what isthmus install made on a cluster",
		Long: `Remove what 'isthmus install' made: every object its inventory (ConfigMap
isthmus-install-<name> in --namespace) lists, then the inventory. Objects that existed before
the install (a namespace you made, for example) are left in place; nothing else is touched.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p := printer{format: output}
			if err := p.validate(); err != nil {
				return err
			}
			dc, err := dynamicClient(kubeconfig, kubeContext)
			if err != nil {
				return err
			}
			res, err := deploy.Uninstall(cmd.Context(), deploy.ApplyConfig{Client: dc, Name: name, Namespace: namespace, Wait: wait, Timeout: timeout, Progress: cmd.ErrOrStderr()})
			if err != nil {
				return err
			}
			return p.print(cmd.OutOrStdout(), res, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "removed %d object(s), left %d in place\n", len(res.Pruned), len(res.Released))
			})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (default: $KUBECONFIG or ~/.kube/config)")
	fl.StringVar(&kubeContext, "context", "", "context in the kubeconfig to use")
	fl.StringVar(&name, "name", "isthmus", "installation name")
	fl.StringVar(&namespace, "namespace", "istio-system", "the installation's namespace")
	fl.StringVarP(&output, "output", "o", "", "json or yaml: the result")
	fl.BoolVar(&wait, "wait", true, "wait until every deleted object is gone")
	fl.DurationVar(&timeout, "timeout", 5*time.Minute, "longest each wait may take")
	return cmd
}

// dynamicClient is kubeConfig's dynamic client.
func dynamicClient(kubeconfig, kubeContext string) (dynamic.Interface, error) {
	rc, err := kubeConfig(kubeconfig, kubeContext)
	if err != nil {
		return nil, err
	}
	return dynamic.NewForConfig(rc)
}
