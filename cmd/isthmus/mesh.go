package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/federation"
)

// newMeshCommand is `isthmus mesh`: operations between whole meshes.
func newMeshCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "mesh", Short: "Operate on whole meshes: peerings with other meshes (mesh federation)"}
	cmd.AddCommand(newPeeringCommand())
	return cmd
}

// peeringFlags locate the running federation endpoint's admin socket.
type peeringFlags struct {
	dir, socket string
	out         printer
}

func (f *peeringFlags) register(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&f.dir, "federation-dir", "", "the primary's --federation-dir (its admin socket is admin.sock there)")
	cmd.PersistentFlags().StringVar(&f.socket, "admin-socket", "", "path of the federation admin socket (instead of --federation-dir)")
	cmd.PersistentFlags().StringVarP(&f.out.format, "output", "o", "", "output format: json or yaml (default: a table)")
}

func (f *peeringFlags) client() (federation.AdminClient, error) {
	if err := f.out.validate(); err != nil {
		return federation.AdminClient{}, err
	}
	switch {
	case f.socket != "":
		return federation.AdminClient{Socket: f.socket}, nil
	case f.dir != "":
		return federation.AdminClient{Socket: filepath.Join(f.dir, "admin.sock")}, nil
	}
	return federation.AdminClient{}, fmt.Errorf("give --federation-dir (the primary's) or --admin-socket")
}

func newPeeringCommand() *cobra.Command {
	var f peeringFlags
	cmd := &cobra.Command{
		Use:   "peering",
		Short: "Peer this mesh with another: tokens, establish, list, show, delete",
		Long: `Peer this mesh with another mesh, without handing over any Kubernetes credential.

On the accepting mesh:   isthmus mesh peering token create --peer NAME
On the dialing mesh:     isthmus mesh peering establish --token TOKEN

The commands talk to the mesh's running federation endpoint (isthmus primary
--federation-addr) over its admin socket in --federation-dir. States: PENDING,
ESTABLISHING, ACTIVE, FAILING, TERMINATED (docs/federation.md).`,
	}
	f.register(cmd)
	token := &cobra.Command{Use: "token", Short: "Peering tokens"}
	var peer string
	create := &cobra.Command{
		Use:     "create",
		Short:   "Make a one-time token for the mesh that will dial this one",
		Example: `  isthmus mesh peering token create --peer mesh-b --federation-dir /var/lib/isthmus/federation`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			tok, exp, err := c.CreateToken(cmd.Context(), peer)
			if err != nil {
				return err
			}
			return f.out.print(cmd.OutOrStdout(), map[string]any{"peer": peer, "token": tok, "expiresAt": exp}, func(tw *tabwriter.Writer) {
				fmt.Fprintln(tw, tok)
				fmt.Fprintf(cmd.ErrOrStderr(), "token for peer %s, usable once until %s; give it to that mesh's operator: isthmus mesh peering establish --token …\n", peer, exp.Format(time.RFC3339))
			})
		},
	}
	create.Flags().StringVar(&peer, "peer", "", "this mesh's name for the peer (a DNS label)")
	create.MarkFlagRequired("peer")
	token.AddCommand(create)

	var tok, tokFile, name string
	establish := &cobra.Command{
		Use:     "establish",
		Short:   "Peer with the mesh that made a token",
		Example: `  isthmus mesh peering establish --token-file token.txt --federation-dir /var/lib/isthmus/federation`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			if tokFile != "" {
				b, err := os.ReadFile(tokFile)
				if err != nil {
					return err
				}
				tok = string(b)
			}
			if strings.TrimSpace(tok) == "" {
				return fmt.Errorf("give --token or --token-file")
			}
			p, err := c.Establish(cmd.Context(), tok, name)
			if err != nil {
				return err
			}
			return f.out.print(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "peering %s with mesh %s (trust domain %s): %s\n", p.Name, p.PeerMesh, p.PeerTrustDomain, p.State)
			})
		},
	}
	establish.Flags().StringVar(&tok, "token", "", "the token")
	establish.Flags().StringVar(&tokFile, "token-file", "", "read the token from this file")
	establish.Flags().StringVar(&name, "name", "", "this mesh's name for the peer (default: its mesh ID)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the peerings with their state, last contact, imported and exported counts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			l, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			return f.out.print(cmd.OutOrStdout(), l, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "mesh %s (trust domain %s), federation %s, %d member(s) in the gossip pool\n\n", l.Mesh, l.TrustDomain, dash(l.FederationID), len(l.Members))
				fmt.Fprintln(tw, "NAME\tROLE\tSTATE\tPEER MESH\tTRUST DOMAIN\tLAST CONTACT\tIMPORTED\tEXPORTED\tSEQUENCE\tREASON")
				for _, p := range l.Peerings {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", p.Name, p.Role, p.State, dash(string(p.PeerMesh)), dash(string(p.PeerTrustDomain)),
						ago(p.LastContact), p.Imported, p.Exported, p.CatalogSequence, dash(oneLine(strings.TrimSpace(p.Reason+" "+p.ImportError))))
				}
				if len(l.Problems) > 0 {
					fmt.Fprintln(tw, "\nNOT SERVED")
					for _, pr := range l.Problems {
						fmt.Fprintln(tw, pr)
					}
				}
			})
		},
	}
	show := &cobra.Command{
		Use:   "show NAME",
		Short: "Show one peering, with why it is not ACTIVE or why its last catalog was refused",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			p, err := c.Show(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return f.out.print(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) { showPeering(tw, p) })
		},
	}
	del := &cobra.Command{
		Use:   "delete NAME",
		Short: "Terminate a peering: its imports go at once and the peer is refused from then on",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := f.client()
			if err != nil {
				return err
			}
			p, err := c.Delete(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return f.out.print(cmd.OutOrStdout(), p, func(tw *tabwriter.Writer) {
				fmt.Fprintf(tw, "peering %s: %s\n", p.Name, p.State)
			})
		},
	}
	cmd.AddCommand(token, establish, list, show, del)
	return cmd
}

func showPeering(tw *tabwriter.Writer, p federation.Peering) {
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("Name", p.Name)
	row("ID", p.ID)
	row("Role", string(p.Role))
	row("State", string(p.State))
	row("Reason", dash(p.Reason))
	row("Peer mesh", dash(string(p.PeerMesh)))
	row("Peer trust domain", dash(string(p.PeerTrustDomain)))
	row("Peer addresses", dash(strings.Join(p.PeerAddresses, ", ")))
	row("Created", p.CreatedAt.Format(time.RFC3339))
	if !p.ExpiresAt.IsZero() && p.State == federation.StatePending {
		row("Token expires", p.ExpiresAt.Format(time.RFC3339))
	}
	row("Last contact", ago(p.LastContact))
	row("Imported", fmt.Sprint(p.Imported))
	row("Exported", fmt.Sprint(p.Exported))
	row("Catalog sequence", fmt.Sprint(p.CatalogSequence))
	row("Import error", dash(p.ImportError))
}
