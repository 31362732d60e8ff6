package scenarios

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/netlab"
	"github.com/isthmus-mesh/isthmus/internal/proc"
)

// The local environment's fault capabilities (faultaction.go).
var (
	_ ComponentRestarter  = (*localEnv)(nil)
	_ APIServerController = (*localEnv)(nil)
	_ Partitioner         = (*localEnv)(nil)
	_ ComponentKiller     = (*localEnv)(nil)
)

// KillComponent implements ComponentKiller: SIGKILL to the component's process group, as
// a crashed process or a lost node ends, then the process is reaped.
func (e *localEnv) KillComponent(comp *Component) error {
	if comp.PID <= 0 {
		return fmt.Errorf("scenarios: kill %s: no process", comp.Name)
	}
	if err := syscall.Kill(-comp.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("scenarios: kill %s: %w", comp.Name, err)
	}
	return comp.Stop()
}

// RestartComponent implements ComponentRestarter: the component's process again, with the
// arguments (so the addresses) it had, its output appended to the same log.
func (e *localEnv) RestartComponent(ctx context.Context, comp *Component) error {
	e.mu.Lock()
	args, ok := e.args[comp]
	closed := e.closed
	e.mu.Unlock()
	if !ok || closed {
		return fmt.Errorf("scenarios: restart %s: not a running component of this environment", comp.Name)
	}
	// Stop is idempotent; a component killed by a fault is already gone.
	comp.Stop()
	p, err := proc.Start(comp.Name, e.p.Binary, args, comp.Log, false, nil)
	if err != nil {
		return err
	}
	comp.PID = p.PID()
	comp.stop = func() error { p.Stop(3 * time.Second); return nil }
	health := comp.Addresses["http"]
	if health == "" {
		health = comp.Addresses["admin"]
	}
	if err := waitReady(ctx, p, "http://"+health+"/readyz", 90*time.Second); err != nil {
		return fmt.Errorf("scenarios: restart %s: %w", comp.Name, err)
	}
	return nil
}

// StopAPIServer implements APIServerController.
func (e *localEnv) StopAPIServer(cluster string) error {
	for _, kc := range e.kube {
		if kc.Name == cluster {
			kc.StopAPIServer()
			return nil
		}
	}
	return fmt.Errorf("scenarios: no cluster %q", cluster)
}

// StartAPIServer implements APIServerController.
func (e *localEnv) StartAPIServer(ctx context.Context, cluster string) error {
	for _, kc := range e.kube {
		if kc.Name == cluster {
			return kc.RestartAPIServer(ctx)
		}
	}
	return fmt.Errorf("scenarios: no cluster %q", cluster)
}

// Partition implements Partitioner: every veth of the network's pod namespace goes down,
// so its pods lose their own gateway and every other network's, and the other networks
// lose them. Traffic inside the network (one namespace) goes on. The routes of every
// namespace are saved first for Heal.
func (e *localEnv) Partition(network string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	n, ok := e.nets[network]
	if !ok {
		return fmt.Errorf("scenarios: partition %s: networks are not separated", network)
	}
	if e.routes == nil {
		e.routes = map[string][]nsRoute{}
		for _, other := range e.nets {
			for _, ns := range []string{nsName(other.pods), nsName(other.gateway)} {
				if ns == "" {
					continue
				}
				routes, err := listRoutes(ns)
				if err != nil {
					return err
				}
				e.routes[ns] = routes
			}
		}
	}
	links, err := vethsOf(n.pods.Name)
	if err != nil {
		return err
	}
	for _, l := range links {
		if err := ipCmd("-n", n.pods.Name, "link", "set", l, "down"); err != nil {
			return fmt.Errorf("scenarios: partition %s: %w", network, err)
		}
	}
	return nil
}

// Heal implements Partitioner: the links come up and every saved route is put back (a
// link that went down took its routes with it).
func (e *localEnv) Heal(network string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	n, ok := e.nets[network]
	if !ok {
		return fmt.Errorf("scenarios: heal %s: networks are not separated", network)
	}
	links, err := vethsOf(n.pods.Name)
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range links {
		errs = append(errs, ipCmd("-n", n.pods.Name, "link", "set", l, "up"))
	}
	for ns, routes := range e.routes {
		for _, r := range routes {
			errs = append(errs, ipCmd("-n", ns, "route", "replace", r.Dst, "via", r.Gateway))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("scenarios: heal %s: %w", network, err)
	}
	return nil
}

// nsRoute is a route via a next hop, as `ip -j route` lists it.
type nsRoute struct {
	Dst     string `json:"dst"`
	Gateway string `json:"gateway"`
}

func listRoutes(ns string) ([]nsRoute, error) {
	out, err := exec.Command("ip", "-n", ns, "-j", "route", "show").Output()
	if err != nil {
		return nil, fmt.Errorf("scenarios: routes of %s: %w", ns, err)
	}
	var all, via []nsRoute
	if err := json.Unmarshal(out, &all); err != nil {
		return nil, fmt.Errorf("scenarios: routes of %s: %w", ns, err)
	}
	for _, r := range all {
		if r.Gateway != "" {
			via = append(via, r)
		}
	}
	return via, nil
}

func vethsOf(ns string) ([]string, error) {
	out, err := exec.Command("ip", "-n", ns, "-j", "link", "show", "type", "veth").Output()
	if err != nil {
		return nil, fmt.Errorf("scenarios: links of %s: %w", ns, err)
	}
	var links []struct {
		Name string `json:"ifname"`
	}
	if err := json.Unmarshal(out, &links); err != nil {
		return nil, fmt.Errorf("scenarios: links of %s: %w", ns, err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Name)
	}
	return names, nil
}

func ipCmd(args ...string) error {
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// nsName is the namespace's name, "" for none.
func nsName(ns *netlab.Namespace) string {
	if ns == nil {
		return ""
	}
	return ns.Name
}
