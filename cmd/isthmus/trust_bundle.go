package main

import (
	"errors"
	"fmt"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// bundleFlags are the flags every `trust bundle` command shares: where the store is.
type bundleFlags struct {
	kubeconfig, kubeContext, namespace string
}

// register adds the shared flags to one subcommand.
func (f *bundleFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster whose bundles to manage")
	cmd.Flags().StringVar(&f.kubeContext, "context", "", "context in the kubeconfig")
	cmd.Flags().StringVar(&f.namespace, "namespace", "istio-system", "control-plane namespace holding the "+trust.BundleConfigMap+" ConfigMap")
}

// store is the bundle store the flags name.
func (f *bundleFlags) store() (trust.BundleStore, error) {
	c, err := kubeClient(f.kubeconfig, f.kubeContext)
	if err != nil {
		return trust.BundleStore{}, err
	}
	return trust.BundleStore{Client: c, Namespace: f.namespace}, nil
}

// update applies change to the store (trust.BundleStore.Update: checked as a whole,
// written at the version read, retried on conflict, nothing written on refusal), then
// says done and prints the bundles as they were written. change may run more than once.
func (f *bundleFlags) update(cmd *cobra.Command, change func(*trust.BundleSet) error, done string) error {
	s, err := f.store()
	if err != nil {
		return err
	}
	set, err := s.Update(cmd.Context(), change)
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), done)
	return printBundles(cmd, printer{}, set)
}

// newTrustBundleCommand groups the bundle-store commands.
func newTrustBundleCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bundle",
		Short: "Show and change a cluster's bundle store: peer trust domains' roots and aliases",
		Long: `Manage the trust bundles of a cluster: the roots of other trust domains its workloads
accept, one SPIFFE bundle per domain (never merged), and trust-domain aliases. They live in
the ConfigMap ` + trust.BundleConfigMap + ` in the control-plane namespace.

What reads the store today: these commands. The trust library can keep a bundle set in step
with it and hand Envoy one validation context per domain over SDS, but no running Isthmus
process (primary, gateway, workload) does so yet: storing a bundle here does not change what
any workload accepts until that is wired.`,
	}
	cmd.AddCommand(newTrustBundleShowCommand(), newTrustBundleAddCommand(), newTrustBundleRemoveCommand(), newTrustBundleAliasCommand())
	return cmd
}

// bundleView is one bundle as `trust bundle show` prints it.
type bundleView struct {
	TrustDomain string   `json:"trustDomain"`
	Roots       []string `json:"roots"` // SHA-256 fingerprints
	Expires     string   `json:"expires"`
	Sequence    uint64   `json:"sequence,omitempty"`
	RefreshHint string   `json:"refreshHint,omitempty"`
}

// bundlesView is the whole store as `trust bundle show -o json|yaml` prints it.
type bundlesView struct {
	Bundles []bundleView      `json:"bundles"`
	Aliases map[string]string `json:"aliases,omitempty"`
}

// viewOf summarises set: each domain's root fingerprints, its earliest expiry (when the
// bundle first stops verifying something) and its SPIFFE sequence and refresh hint.
func viewOf(set *trust.BundleSet) bundlesView {
	v := bundlesView{Bundles: []bundleView{}}
	for _, td := range set.Domains() {
		b, _ := set.Get(td)
		bv := bundleView{TrustDomain: string(td)}
		var earliest time.Time
		for _, c := range b.X509Authorities() {
			bv.Roots = append(bv.Roots, trust.Fingerprint(c.Raw))
			if earliest.IsZero() || c.NotAfter.Before(earliest) {
				earliest = c.NotAfter
			}
		}
		bv.Expires = earliest.UTC().Format(time.RFC3339)
		if seq, ok := b.SequenceNumber(); ok {
			bv.Sequence = seq
		}
		if h, ok := b.RefreshHint(); ok {
			bv.RefreshHint = h.String()
		}
		v.Bundles = append(v.Bundles, bv)
	}
	if a := set.Aliases(); len(a) > 0 {
		v.Aliases = map[string]string{}
		for k, t := range a {
			v.Aliases[string(k)] = string(t)
		}
	}
	return v
}

// printBundles prints set in out's format; the table shortens fingerprints to 16 hex
// digits and lists aliases after the bundles.
func printBundles(cmd *cobra.Command, out printer, set *trust.BundleSet) error {
	v := viewOf(set)
	return out.print(cmd.OutOrStdout(), v, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "TRUST DOMAIN\tROOTS\tEXPIRES\tSEQUENCE\tFINGERPRINTS")
		for _, b := range v.Bundles {
			fps := ""
			for i, f := range b.Roots {
				if i > 0 {
					fps += ","
				}
				fps += f[:16]
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", b.TrustDomain, len(b.Roots), b.Expires, b.Sequence, fps)
		}
		aliases := make([]string, 0, len(v.Aliases))
		for a := range v.Aliases {
			aliases = append(aliases, a)
		}
		sort.Strings(aliases)
		for _, a := range aliases {
			fmt.Fprintf(tw, "%s\t→ %s\t(alias)\t\t\n", a, v.Aliases[a])
		}
	})
}

// newTrustBundleShowCommand prints the store; an absent ConfigMap is an empty store.
func newTrustBundleShowCommand() *cobra.Command {
	var (
		f   bundleFlags
		out printer
	)
	cmd := &cobra.Command{
		Use:   "show",
		Short: "List the trust domains, their roots and the aliases",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			s, err := f.store()
			if err != nil {
				return err
			}
			set, err := s.Load(cmd.Context())
			if err != nil {
				return err
			}
			return printBundles(cmd, out, set)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	return cmd
}

// newTrustBundleAddCommand reads one domain's bundle (trust.ReadBundle) and stores it,
// replacing any bundle the domain had. A domain that is an alias here is refused.
func newTrustBundleAddCommand() *cobra.Command {
	var (
		f                        bundleFlags
		td, file, pemFile, caDir string
		endpoint, endpointCA     string
	)
	cmd := &cobra.Command{
		Use:   "add --trust-domain TD (--file BUNDLE.json | --pem ROOTS.pem | --ca-dir DIR | --endpoint URL)",
		Short: "Add or replace a trust domain's bundle",
		Long: `Add or replace the bundle of one trust domain, from a SPIFFE bundle file (JWKS, as a
bundle endpoint serves it), a PEM file of root certificates, a plug-in CA directory (its
root-cert.pem), or a peer's SPIFFE bundle endpoint (https_web; --endpoint-ca names the CA
that signs the endpoint's certificate when it is not a public one). The bundle is checked
(X.509 roots present, all CA certificates, not expired, none naming another trust domain)
before anything is written.`,
		Example: "  isthmus trust bundle add --trust-domain west.example --endpoint https://bundle.west.example/ --endpoint-ca west-web-ca.pem",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			domain, err := mesh.ParseTrustDomain(td)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			sources := 0
			for _, s := range []string{file, pemFile, caDir, endpoint} {
				if s != "" {
					sources++
				}
			}
			if sources != 1 {
				return errors.New("give exactly one of --file, --pem, --ca-dir and --endpoint")
			}
			// ReadBundle checks the bundle (roots present, CA certificates, not expired, not
			// another domain's) before anything is written.
			b, err := trust.ReadBundle(cmd.Context(), domain, trust.BundleSource{File: file, PEMFile: pemFile, CADir: caDir, Endpoint: endpoint, EndpointCA: endpointCA})
			if err != nil {
				return err
			}
			return f.update(cmd, func(set *trust.BundleSet) error { return set.Set(b) },
				fmt.Sprintf("bundle of %s stored (%d root(s))", domain, len(b.X509Authorities())))
		},
	}
	f.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&td, "trust-domain", "", "the trust domain whose bundle this is (required)")
	fl.StringVar(&file, "file", "", "SPIFFE bundle (JWKS) file")
	fl.StringVar(&pemFile, "pem", "", "PEM file of the domain's root certificates")
	fl.StringVar(&caDir, "ca-dir", "", "plug-in CA directory of the domain (root-cert.pem is read)")
	fl.StringVar(&endpoint, "endpoint", "", "URL of the domain's SPIFFE bundle endpoint (https_web)")
	fl.StringVar(&endpointCA, "endpoint-ca", "", "PEM file of the CA that signs the endpoint's TLS certificate (default: the system's roots)")
	cmd.MarkFlagRequired("trust-domain")
	return cmd
}

// newTrustBundleRemoveCommand removes a domain's bundle or an alias. A domain that is an
// alias's target is refused (remove the alias first), so no alias is left verifying
// nothing by accident.
func newTrustBundleRemoveCommand() *cobra.Command {
	var f bundleFlags
	cmd := &cobra.Command{
		Use:   "remove TRUST_DOMAIN",
		Short: "Stop trusting a trust domain (its bundle, or an alias)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			domain, err := mesh.ParseTrustDomain(args[0])
			if err != nil {
				return err
			}
			return f.update(cmd, func(set *trust.BundleSet) error {
				_, has := set.Get(domain)
				_, aliased := set.Aliases()[domain]
				if !has && !aliased {
					return fmt.Errorf("%s has no bundle and is no alias here (see `isthmus trust bundle show`)", domain)
				}
				for a, t := range set.Aliases() {
					if t == domain {
						return fmt.Errorf("%s is the target of alias %s; remove the alias first", domain, a)
					}
				}
				set.Remove(domain)
				set.RemoveAlias(domain)
				return nil
			}, string(domain)+" removed")
		},
	}
	f.register(cmd)
	return cmd
}

// newTrustBundleAliasCommand makes ALIAS's identities verify under TARGET's bundle;
// TARGET must have one, and ALIAS must not.
func newTrustBundleAliasCommand() *cobra.Command {
	var f bundleFlags
	cmd := &cobra.Command{
		Use:   "alias ALIAS TARGET",
		Short: "Accept identities of trust domain ALIAS under TARGET's roots (a renamed domain)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			alias, err := mesh.ParseTrustDomain(args[0])
			if err != nil {
				return err
			}
			target, err := mesh.ParseTrustDomain(args[1])
			if err != nil {
				return err
			}
			return f.update(cmd, func(set *trust.BundleSet) error {
				if _, ok := set.Get(target); !ok {
					return fmt.Errorf("%s has no bundle here; add it first (isthmus trust bundle add)", target)
				}
				return set.SetAlias(alias, target)
			}, fmt.Sprintf("%s is now an alias of %s", alias, target))
		},
	}
	f.register(cmd)
	return cmd
}
