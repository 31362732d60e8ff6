package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at link time (-X main.version=...); "dev" for source builds.
var version = "dev"

// main runs the command tree with a context that SIGINT and SIGTERM cancel: daemons shut
// down gracefully, CLI commands stop waiting. The error is printed once, here (commands
// are silenced), and an exitError chooses the exit code; any other error exits 1.
func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRootCommand()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(1)
	}
}

// exitError carries a specific exit code out of a command.
type exitError struct {
	code int
	err  error
}

// Error is the wrapped error's message.
func (e exitError) Error() string { return e.err.Error() }

// Unwrap lets errors.Is and errors.As see the wrapped error.
func (e exitError) Unwrap() error { return e.err }

// newRootCommand is the whole command tree: every subcommand is registered here and
// nowhere else. Usage is not printed on an error (it buries the message), nor are errors
// printed by cobra (main prints them).
func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:   "isthmus",
		Short: "Isthmus joins Kubernetes clusters, networks and meshes into one service mesh",
		Long: `Isthmus joins Kubernetes clusters, networks and whole meshes into one service mesh.

Start here:
  isthmus up                        a multi-network mesh on local clusters, checked end to end
  isthmus scenario list             the deployment models it can bring up
  isthmus cluster up --clusters 2   run two real Kubernetes clusters on this machine
  isthmus cluster list              see their API servers and kubeconfigs
  isthmus cluster down              stop them`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newClusterCommand(), newPrimaryCommand(), newGatewayCommand(), newProxyCommand(), newRemoteSecretCommand(), newStatusCommand(), newTrustCommand(), newVersionCommand(),
		newUpCommand(), newDownCommand(), newScenarioCommand(), newWorkloadCommand(), newAgentCommand(), newMeshCommand(),
		newInstallCommand(), newUninstallCommand(), newImageCommand())
	return root
}

// newVersionCommand prints version and the Kubernetes and etcd versions the local
// clusters are built from.
func newVersionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the isthmus version and the Kubernetes version its local clusters run",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "isthmus %s (local clusters: Kubernetes %s, etcd %s)\n", version, kubeVersion(), etcdVersion())
			return nil
		},
	}
}
