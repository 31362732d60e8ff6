package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/scenarios"
)

// upMarker is in the command line of every isthmus process; `isthmus down` signals a
// recorded PID only if it still carries it, so a recycled PID is never hit.
const upMarker = "isthmus"

func newUpCommand() *cobra.Command {
	var (
		f      scenarioFlags
		detach bool
	)
	cmd := &cobra.Command{
		Use:   "up [NAME]",
		Short: "Bring a scenario up on local clusters and keep it running (the main job)",
		Long: `Bring a scenario up on real local clusters: the clusters, its networks, a primary per
primary cluster, east-west gateways and workloads with certificates from the mesh CA.
Then check reachability from every cluster to every service, print the table and how to
explore the mesh, and keep running until Ctrl-C, which tears everything down.

With --detach it returns once the table is printed and keeps running in the background;
stop it with ` + "`isthmus down`" + `.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			t, err := f.topology(args)
			if err != nil {
				return err
			}
			dir := filepath.Join(f.dir, t.Name)
			if s, err := readUpState(dir); err == nil && proc.PIDMatches(s.PID, upMarker) && s.PID != os.Getpid() {
				return fmt.Errorf("scenario %s is already running (pid %d); stop it with `isthmus down %s`", t.Name, s.PID, t.Name)
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			if detach {
				return upDetached(cmd.OutOrStdout(), dir, t.Name)
			}
			return upForeground(cmd, &f, t, dir)
		},
	}
	f.register(cmd, "multi-network")
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "return once the scenario is up and keep it running in the background")
	return cmd
}

func upForeground(cmd *cobra.Command, f *scenarioFlags, t *scenarios.Topology, dir string) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	state := &upState{Scenario: t.Name, PID: os.Getpid(), Dir: dir, Started: time.Now()}
	if err := state.write(); err != nil {
		return err
	}
	defer os.Remove(filepath.Join(dir, upStateFile))
	r, err := f.up(ctx, out, t, filepath.Join(dir, "run"))
	if err != nil {
		if ctx.Err() != nil {
			return exitError{code: 130, err: errors.New("interrupted; everything started was stopped")}
		}
		state.Failed = err.Error()
		state.write()
		return err
	}
	defer func() {
		fmt.Fprintln(out, "tearing down: workloads, gateways, primaries, clusters, networks")
		r.Close()
		fmt.Fprintln(out, "stopped")
	}()
	fmt.Fprintln(out, "checking reachability from every cluster to every service")
	rep, err := r.Check(ctx, scenarios.CheckOptions{Timeout: f.timeout})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	var b bytes.Buffer
	rep.WriteTable(&b)
	b.WriteString(explore(r, t.Name))
	out.Write(b.Bytes())
	state.Ready, state.Summary = true, b.String()
	if !rep.Passed {
		state.Failed = "some expectations failed"
	}
	if err := state.write(); err != nil {
		return err
	}
	<-ctx.Done()
	return nil
}

// upDetached runs `isthmus up` again as a background process in a new session, shows its
// progress until it is up (or has failed) and returns.
func upDetached(w io.Writer, dir, name string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	var args []string
	for _, a := range os.Args[1:] {
		if a != "--detach" && a != "-d" && a != "--detach=true" {
			args = append(args, a)
		}
	}
	logPath := filepath.Join(dir, "up.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logf.Close()
	os.Remove(filepath.Join(dir, upStateFile))
	c := exec.Command(exe, args...)
	c.Stdout, c.Stderr = logf, logf
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	// Progress is the child's log, followed from a reader of its own: each tick copies
	// what was appended since the last.
	tail, err := os.Open(logPath)
	if err != nil {
		return err
	}
	defer tail.Close()
	for {
		select {
		case err := <-exited:
			io.Copy(w, tail)
			return fmt.Errorf("the background `isthmus up` ended (%v); its log is %s", err, logPath)
		case <-time.After(200 * time.Millisecond):
		}
		io.Copy(w, tail)
		if s, err := readUpState(dir); err == nil && s.PID == c.Process.Pid && s.Ready {
			io.Copy(w, tail) // the table, written just before the state said ready
			fmt.Fprintf(w, "\nscenario %s runs in the background (pid %d, log %s); stop it with `isthmus down %s`\n", name, s.PID, logPath, name)
			return nil
		}
	}
}

func newDownCommand() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "down [NAME]",
		Short: "Stop a scenario started with `isthmus up` (all of them without NAME)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var dirs []string
			if len(args) == 1 {
				dirs = []string{filepath.Join(dir, args[0])}
			} else {
				entries, _ := os.ReadDir(dir)
				for _, e := range entries {
					if e.IsDir() {
						dirs = append(dirs, filepath.Join(dir, e.Name()))
					}
				}
			}
			stopped := 0
			for _, d := range dirs {
				s, err := readUpState(d)
				if errors.Is(err, os.ErrNotExist) {
					continue
				}
				if err != nil {
					return err
				}
				if proc.PIDMatches(s.PID, upMarker) {
					fmt.Fprintf(cmd.OutOrStdout(), "stopping scenario %s (pid %d)…\n", s.Scenario, s.PID)
					proc.StopPID(s.PID, upMarker, 90*time.Second)
					stopped++
				}
				os.Remove(filepath.Join(d, upStateFile))
			}
			if stopped == 0 {
				if len(args) == 1 {
					fmt.Fprintf(cmd.OutOrStdout(), "scenario %s is not running\n", args[0])
				} else {
					fmt.Fprintln(cmd.OutOrStdout(), "no scenario is running")
				}
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "stopped %d scenario(s)\n", stopped)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "state-dir", defaultScenarioDir(), "where runs keep their state")
	return cmd
}
