package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// federateFlags say where a cluster's federation relationships are.
type federateFlags struct {
	kubeconfig, kubeContext, namespace string
}

func (f *federateFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster whose federation to manage")
	cmd.Flags().StringVar(&f.kubeContext, "context", "", "context in the kubeconfig")
	cmd.Flags().StringVar(&f.namespace, "namespace", "istio-system", "control-plane namespace holding the "+trust.FederationConfigMap+" ConfigMap")
}

func (f *federateFlags) stores() (trust.FederationStore, trust.BundleStore, error) {
	c, err := kubeClient(f.kubeconfig, f.kubeContext)
	if err != nil {
		return trust.FederationStore{}, trust.BundleStore{}, err
	}
	return trust.FederationStore{Client: c, Namespace: f.namespace}, trust.BundleStore{Client: c, Namespace: f.namespace}, nil
}

func newTrustFederateCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "federate",
		Short: "Federate with other trust domains: fetch their bundles from their bundle endpoints",
		Long: `Manage a cluster's federation relationships: the peer trust domains whose SPIFFE bundles
its primary fetches from their bundle endpoints (honouring each bundle's refresh hint,
keeping the last good bundle when a fetch fails) and hands to every workload, one bundle
per domain, never merged. They live in the ConfigMap ` + trust.FederationConfigMap + ` in the
control-plane namespace; see their state with ` + "`isthmus trust status`" + `.`,
	}
	cmd.AddCommand(newTrustFederateAddCommand(), newTrustFederateRemoveCommand(), newTrustFederateListCommand())
	return cmd
}

func newTrustFederateAddCommand() *cobra.Command {
	var (
		f                                        federateFlags
		out                                      printer
		rel                                      trust.Relationship
		bootFile, bootPEM, bootCADir, endpointCA string
		localTD                                  string
	)
	cmd := &cobra.Command{
		Use:   "add --trust-domain TD --endpoint URL [--profile https_spiffe --endpoint-spiffe-id ID --bootstrap-*] ",
		Short: "Add or replace the federation relationship with a trust domain",
		Long: `Add (or replace) a federation relationship. With the https_spiffe profile (the default)
the endpoint is authenticated by its SPIFFE ID (--endpoint-spiffe-id; an Isthmus primary's
is spiffe://TD/ns/istio-system/sa/` + trust.EndpointServiceAccount + `) against the domain's
bundle, starting from a bootstrap bundle (--bootstrap-bundle, --bootstrap-pem or
--bootstrap-ca-dir). With https_web it is authenticated by a Web PKI certificate
(--endpoint-ca when its CA is not a public one). The relationship is checked whole before
anything is written; a refused one writes nothing.`,
		Example: `  isthmus trust federate add --context east --trust-domain west.example \
    --endpoint https://bundle.west.example:8443/ \
    --endpoint-spiffe-id spiffe://west.example/ns/istio-system/sa/isthmus-bundle-endpoint \
    --bootstrap-pem west-root.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			domain, err := mesh.ParseTrustDomain(rel.TrustDomain)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			if rel.Profile == trust.ProfileSPIFFE {
				n := 0
				for _, s := range []string{bootFile, bootPEM, bootCADir} {
					if s != "" {
						n++
					}
				}
				if n != 1 {
					return errors.New("https_spiffe: give exactly one of --bootstrap-bundle, --bootstrap-pem and --bootstrap-ca-dir (the roots that authenticate the endpoint's first answer)")
				}
				b, err := trust.ReadBundle(cmd.Context(), domain, trust.BundleSource{File: bootFile, PEMFile: bootPEM, CADir: bootCADir})
				if err != nil {
					return err
				}
				raw, err := b.Marshal()
				if err != nil {
					return err
				}
				rel.BootstrapBundle = string(raw)
			}
			if endpointCA != "" {
				data, err := os.ReadFile(endpointCA)
				if err != nil {
					return fmt.Errorf("--endpoint-ca: %w", err)
				}
				rel.EndpointCA = string(data)
			}
			local := mesh.TrustDomain("")
			if localTD != "" {
				if local, err = mesh.ParseTrustDomain(localTD); err != nil {
					return fmt.Errorf("--local-trust-domain: %w", err)
				}
			}
			fs, _, err := f.stores()
			if err != nil {
				return err
			}
			rels, err := fs.Update(cmd.Context(), func(r []trust.Relationship) ([]trust.Relationship, error) {
				return trust.AddRelationship(r, rel, local)
			})
			if err != nil {
				return err
			}
			if out.format == "" {
				fmt.Fprintf(cmd.OutOrStdout(), "federating with %s through %s (%s); the primary fetches its bundle within a second\n", domain, rel.EndpointURL, rel.Profile)
			}
			return printRelationships(cmd, out, rels)
		},
	}
	f.register(cmd)
	fl := cmd.Flags()
	fl.StringVar(&rel.TrustDomain, "trust-domain", "", "the peer trust domain (required)")
	fl.StringVar(&rel.EndpointURL, "endpoint", "", "URL of the peer's SPIFFE bundle endpoint, https:// (required)")
	fl.StringVar(&rel.Profile, "profile", trust.ProfileSPIFFE, "endpoint profile: https_spiffe or https_web")
	fl.StringVar(&rel.EndpointSPIFFEID, "endpoint-spiffe-id", "", "https_spiffe: the SPIFFE ID the endpoint presents")
	fl.StringVar(&bootFile, "bootstrap-bundle", "", "https_spiffe: SPIFFE bundle (JWKS) file of the peer domain")
	fl.StringVar(&bootPEM, "bootstrap-pem", "", "https_spiffe: PEM file of the peer domain's roots")
	fl.StringVar(&bootCADir, "bootstrap-ca-dir", "", "https_spiffe: plug-in CA directory of the peer domain (root-cert.pem)")
	fl.StringVar(&endpointCA, "endpoint-ca", "", "https_web: PEM file of the CA that signs the endpoint's certificate (default: the system's roots)")
	fl.StringVar(&localTD, "local-trust-domain", "", "this cluster's own trust domain, refused as a peer")
	fl.StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	cmd.MarkFlagRequired("trust-domain")
	cmd.MarkFlagRequired("endpoint")
	return cmd
}

func newTrustFederateRemoveCommand() *cobra.Command {
	var f federateFlags
	cmd := &cobra.Command{
		Use:   "remove TRUST_DOMAIN",
		Short: "End the federation with a trust domain: its bundle leaves the cluster and its identities stop verifying",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			domain, err := mesh.ParseTrustDomain(args[0])
			if err != nil {
				return err
			}
			fs, bs, err := f.stores()
			if err != nil {
				return err
			}
			if _, err := fs.Update(cmd.Context(), func(r []trust.Relationship) ([]trust.Relationship, error) {
				return trust.RemoveRelationship(r, domain)
			}); err != nil {
				return err
			}
			// The primary takes the bundle out too; doing it here makes it immediate even
			// when the primary is down.
			if _, err := bs.Update(cmd.Context(), func(set *trust.BundleSet) error {
				for a, t := range set.Aliases() {
					if t == domain {
						set.RemoveAlias(a)
					}
				}
				set.Remove(domain)
				return nil
			}); err != nil {
				return fmt.Errorf("relationship removed, but its bundle is still in %s: %w", trust.BundleConfigMap, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "federation with %s removed; its bundle left %s\n", domain, trust.BundleConfigMap)
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func newTrustFederateListCommand() *cobra.Command {
	var (
		f   federateFlags
		out printer
	)
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the federation relationships",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			fs, _, err := f.stores()
			if err != nil {
				return err
			}
			rels, err := fs.Load(cmd.Context())
			if err != nil {
				return err
			}
			return printRelationships(cmd, out, rels)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	return cmd
}

// relationshipView is a relationship as list prints it: the bootstrap bundle and CA by
// fingerprint rather than in full.
type relationshipView struct {
	TrustDomain      string   `json:"trustDomain"`
	EndpointURL      string   `json:"endpointURL"`
	Profile          string   `json:"profile"`
	EndpointSPIFFEID string   `json:"endpointSPIFFEID,omitempty"`
	BootstrapRoots   []string `json:"bootstrapRoots,omitempty"`
	EndpointCA       bool     `json:"endpointCA,omitempty"`
}

func printRelationships(cmd *cobra.Command, out printer, rels []trust.Relationship) error {
	views := []relationshipView{}
	for _, r := range rels {
		v := relationshipView{TrustDomain: r.TrustDomain, EndpointURL: r.EndpointURL, Profile: r.Profile, EndpointSPIFFEID: r.EndpointSPIFFEID, EndpointCA: r.EndpointCA != ""}
		if r.BootstrapBundle != "" {
			if b, err := trust.ParsePeerBundle(mesh.TrustDomain(r.TrustDomain), []byte(r.BootstrapBundle)); err == nil {
				for _, c := range b.X509Authorities() {
					v.BootstrapRoots = append(v.BootstrapRoots, trust.Fingerprint(c.Raw))
				}
			}
		}
		views = append(views, v)
	}
	return out.print(cmd.OutOrStdout(), map[string]any{"relationships": views}, func(tw *tabwriter.Writer) {
		fmt.Fprintln(tw, "TRUST DOMAIN\tPROFILE\tENDPOINT\tENDPOINT SPIFFE ID")
		for _, v := range views {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.TrustDomain, v.Profile, v.EndpointURL, v.EndpointSPIFFEID)
		}
	})
}

// trustzDoc is /debug/trustz as `trust status` reads it.
type trustzDoc struct {
	trust.TrustStatus
	Federation *trust.FederationStatus `json:"federation,omitempty"`
}

func newTrustStatusCommand() *cobra.Command {
	var (
		primaries []string
		out       printer
	)
	cmd := &cobra.Command{
		Use:   "status --primary [CLUSTER=]HOST:PORT...",
		Short: "Show each primary's CA, its bundle endpoint and every federated peer's bundle state",
		Long: `Read each primary's /debug/trustz (its --http-address) and show what it signs with, the
bundle its endpoint serves (sequence, roots), and per federated peer: state, sequence,
last success, next refresh, the bundle's age and the last error with its reason.`,
		Example: "  isthmus trust status --primary east=10.0.0.5:15014 --primary west=10.0.1.5:15014 -o yaml",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := out.validate(); err != nil {
				return err
			}
			if len(primaries) == 0 {
				return errors.New("name at least one --primary HOST:PORT (a primary's --http-address)")
			}
			client := &http.Client{Timeout: 5 * time.Second}
			docs := map[string]trustzDoc{}
			var names []string
			for _, p := range primaries {
				name, addr := p, p
				if id, a, err := clusterPair("--primary", p); err == nil {
					name, addr = string(id), a
				}
				var doc trustzDoc
				req, _ := http.NewRequestWithContext(cmd.Context(), http.MethodGet, "http://"+addr+"/debug/trustz", nil)
				resp, err := client.Do(req)
				if err != nil {
					return fmt.Errorf("primary %s: %w", name, err)
				}
				err = json.NewDecoder(resp.Body).Decode(&doc)
				resp.Body.Close()
				if err != nil || resp.StatusCode != http.StatusOK {
					return fmt.Errorf("primary %s: /debug/trustz: %s %v (is it running with --ca-dir?)", name, resp.Status, err)
				}
				docs[name] = doc
				names = append(names, name)
			}
			return out.print(cmd.OutOrStdout(), docs, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, "PRIMARY\tTRUST DOMAIN\tPEER\tSTATE\tSEQUENCE\tLAST SUCCESS\tAGE\tNEXT REFRESH\tLAST ERROR")
				for _, n := range names {
					d := docs[n]
					seq := ""
					if d.Federation != nil && d.Federation.Endpoint != nil {
						seq = fmt.Sprint(d.Federation.Endpoint.Sequence)
					}
					fmt.Fprintf(tw, "%s\t%s\t(own bundle)\tserving\t%s\t\t\t\t\n", n, d.TrustDomain, seq)
					if d.Federation == nil {
						continue
					}
					for _, p := range d.Federation.Peers {
						last, next := "never", ""
						if !p.LastSuccess.IsZero() {
							last = p.LastSuccess.UTC().Format(time.RFC3339)
						}
						if !p.NextRefresh.IsZero() {
							next = time.Until(p.NextRefresh).Round(time.Second).String()
						}
						lastErr := ""
						if p.LastError != "" {
							lastErr = p.LastErrorReason + ": " + p.LastError
						}
						state := p.State
						if !p.Stored {
							state += " (not in the bundle store yet)"
						}
						fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", n, d.TrustDomain, p.TrustDomain, state, p.Sequence, last, p.Age, next, lastErr)
					}
				}
			})
		},
	}
	cmd.Flags().StringSliceVar(&primaries, "primary", nil, "[CLUSTER=]HOST:PORT: a primary's HTTP address (repeatable)")
	cmd.Flags().StringVarP(&out.format, "output", "o", "", "output format: json or yaml (default: table)")
	return cmd
}

// peerRoots reads, for `trust rotate --peer-primary NAME=HOST:PORT`, the roots each peer
// primary holds in force for the rotating domain (its trustz federation peers).
func peerRoots(flags []string) ([]string, func(ctx context.Context, peer string, td mesh.TrustDomain) ([]string, error), error) {
	urls := map[string]string{}
	var names []string
	for _, p := range flags {
		name, addr, ok := strings.Cut(p, "=")
		if !ok || name == "" || addr == "" {
			return nil, nil, fmt.Errorf("--peer-primary %q: want NAME=HOST:PORT", p)
		}
		urls[name] = "http://" + addr + "/debug/trustz"
		names = append(names, name)
	}
	client := &http.Client{Timeout: 5 * time.Second}
	return names, func(ctx context.Context, peer string, td mesh.TrustDomain) ([]string, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, urls[peer], nil)
		resp, err := client.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var doc trustzDoc
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			return nil, fmt.Errorf("%s: %w", urls[peer], err)
		}
		if doc.Federation != nil {
			for _, p := range doc.Federation.Peers {
				if p.TrustDomain == string(td) {
					return p.Roots, nil
				}
			}
		}
		return nil, fmt.Errorf("is not federated with %s", td)
	}, nil
}
