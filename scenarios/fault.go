package scenarios

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Fault kinds: what a fault breaks and what its end restores.
const (
	// FaultPartition cuts every link of a network's namespace (its pods lose the other
	// networks and their own gateway), then restores them. Target: a network.
	FaultPartition = "partition"
	// FaultGatewayKill stops a network's east-west gateway and starts a new one on the
	// same public address. Target: a network with a gateway.
	FaultGatewayKill = "gateway-kill"
	// FaultPrimaryKill stops a cluster's primary (xDS and CA) and starts it again on the
	// same addresses; proxies keep their last configuration meanwhile. Target: a primary
	// cluster.
	FaultPrimaryKill = "primary-kill"
	// FaultAPIServerStop stops a cluster's API server (etcd, the controllers and the pods
	// keep running), then starts it again. Target: a cluster.
	FaultAPIServerStop = "apiserver-stop"
	// FaultCAUnreachable makes a primary's CA port unreachable to the cluster's workloads
	// (their path to it is cut, open connections reset) while xDS keeps working; workloads
	// keep their certificates and renew once it returns. Target: a primary cluster.
	FaultCAUnreachable = "ca-unreachable"
	// FaultRootRotation rotates the mesh's root (trust.Rotate over every primary's CA
	// directory: publish, reissue, retire) during the fault's duration. Target: "mesh".
	FaultRootRotation = "root-rotation"
)

// FaultKinds lists every fault kind, sorted.
func FaultKinds() []string {
	return []string{FaultAPIServerStop, FaultCAUnreachable, FaultGatewayKill, FaultPartition, FaultPrimaryKill, FaultRootRotation}
}

// MeshTarget is the target of faults that hit the mesh as a whole (root rotation).
const MeshTarget = "mesh"

// Duration is a time.Duration written as a Go duration string ("10s", "1m30s") in
// topology files and reports.
type Duration struct{ time.Duration }

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON reads a duration string; bare numbers are refused, because a unit-less
// "10" is ambiguous.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration string such as \"10s\", got %s", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// FaultSpec is one fault: what it hits, when it starts (counted from the start of the
// run's load) and how long it lasts before what it broke is restored.
type FaultSpec struct {
	// Name names the fault in phase names ("during gw2-down"); default <kind>-<target>.
	Name string `json:"name,omitempty"`
	// Kind is one of FaultKinds.
	Kind string `json:"kind"`
	// Target is the network, cluster or MeshTarget the fault hits (see each kind).
	Target string `json:"target"`
	// Start is when the fault begins, from the start of the load; Duration how long it
	// lasts. Duration must be positive.
	Start    Duration `json:"start"`
	Duration Duration `json:"duration"`
}

// End is when the fault's restoration begins.
func (f FaultSpec) End() time.Duration { return f.Start.Duration + f.Duration.Duration }

// String writes the fault in the command-line form ParseFault reads.
func (f FaultSpec) String() string {
	s := fmt.Sprintf("%s:%s@%s+%s", f.Kind, f.Target, f.Start.Duration, f.Duration.Duration)
	if f.Name != "" && f.Name != f.defaultName() {
		s = f.Name + "=" + s
	}
	return s
}

func (f FaultSpec) defaultName() string { return f.Kind + "-" + f.Target }

// ParseFault reads a fault from its command-line form:
//
//	[NAME=]KIND:TARGET@START+DURATION     e.g. gateway-kill:network-2@10s+15s
//
// START and DURATION are Go durations. ParseFault checks the form only; Validate checks the
// kind, the target and the schedule against the topology.
func ParseFault(s string) (FaultSpec, error) {
	var f FaultSpec
	orig := s
	bad := func(format string, args ...any) (FaultSpec, error) {
		return FaultSpec{}, fmt.Errorf("scenarios: fault %q: %s (want [NAME=]KIND:TARGET@START+DURATION, e.g. gateway-kill:network-2@10s+15s)", orig, fmt.Sprintf(format, args...))
	}
	if name, rest, ok := strings.Cut(s, "="); ok {
		if err := checkName(name); err != nil {
			return bad("name: %v", err)
		}
		f.Name, s = name, rest
	}
	what, when, ok := strings.Cut(s, "@")
	if !ok {
		return bad("no @START+DURATION")
	}
	kind, target, ok := strings.Cut(what, ":")
	if !ok || kind == "" || target == "" {
		return bad("no KIND:TARGET")
	}
	start, dur, ok := strings.Cut(when, "+")
	if !ok {
		return bad("no +DURATION after the start")
	}
	var err error
	if f.Start.Duration, err = time.ParseDuration(start); err != nil {
		return bad("start: %v", err)
	}
	if f.Duration.Duration, err = time.ParseDuration(dur); err != nil {
		return bad("duration: %v", err)
	}
	f.Kind, f.Target = kind, target
	return f, nil
}

// faultComponent names the component a fault acts on, for overlap checks: two faults on
// one component at once cannot both be applied and undone in order (a primary killed
// while its CA path is cut would be restarted behind the cut).
func faultComponent(f FaultSpec) string {
	switch f.Kind {
	case FaultPrimaryKill, FaultCAUnreachable:
		return "primary of " + f.Target
	case FaultGatewayKill:
		return "gateway of " + f.Target
	case FaultPartition:
		return "links of " + f.Target
	case FaultAPIServerStop:
		return "API server of " + f.Target
	default:
		return f.Target
	}
}

// validateFaults checks t.Faults against the topology and the run's length (zero: the
// run lasts as long as the faults need), adding each problem with its place.
func (t *Topology) validateFaults(add func(string, ...any)) {
	names := map[string]int{}
	for i, f := range t.Faults {
		place := fmt.Sprintf("faults[%d]", i)
		if f.Name == "" {
			t.Faults[i].Name = f.defaultName()
			f.Name = t.Faults[i].Name
		} else if err := checkName(f.Name); err != nil {
			add("%s.name: %v", place, err)
		}
		if j, dup := names[f.Name]; dup {
			add("%s.name: duplicate fault name %q (faults[%d])", place, f.Name, j)
		}
		names[f.Name] = i
		if f.Start.Duration < 0 {
			add("%s.start: %s is negative", place, f.Start.Duration)
		}
		if f.Duration.Duration <= 0 {
			add("%s.duration: %s is not positive", place, f.Duration.Duration)
		}
		if err := t.checkFaultTarget(f); err != nil {
			add("%s: %v", place, err)
		}
		if run := t.Load.Duration.Duration; run > 0 && f.End() > run {
			add("%s: %s ends at %s, past the run's %s (load.duration)", place, f.Name, f.End(), run)
		}
	}
	// One component takes one fault at a time; a fault on it must end before the next
	// starts, so that each restoration undoes exactly its own fault.
	for i, a := range t.Faults {
		for j := i + 1; j < len(t.Faults); j++ {
			b := t.Faults[j]
			if faultComponent(a) == faultComponent(b) && a.Start.Duration < b.End() && b.Start.Duration < a.End() {
				add("faults[%d] and faults[%d]: %s (%s–%s) and %s (%s–%s) overlap on the %s and cannot be scheduled; start one after the other ends",
					i, j, a.Name, a.Start.Duration, a.End(), b.Name, b.Start.Duration, b.End(), faultComponent(a))
			}
		}
	}
}

// checkFaultTarget says why f's target does not fit its kind, or nil.
func (t *Topology) checkFaultTarget(f FaultSpec) error {
	primary := func() error {
		c, ok := t.Cluster(f.Target)
		if !ok {
			return fmt.Errorf("target: unknown cluster %q (have %s)", f.Target, strings.Join(t.clusterNames(), ", "))
		}
		if c.ControlPlane.Role != RolePrimary {
			return fmt.Errorf("target: cluster %q runs no primary", f.Target)
		}
		return nil
	}
	switch f.Kind {
	case FaultPartition:
		if _, ok := t.Network(f.Target); !ok {
			return fmt.Errorf("target: unknown network %q", f.Target)
		}
		if !t.MultiNetwork() {
			return fmt.Errorf("target: network %q is the only network, so it has no links to cut", f.Target)
		}
	case FaultGatewayKill:
		n, ok := t.Network(f.Target)
		if !ok {
			return fmt.Errorf("target: unknown network %q", f.Target)
		}
		if !n.Gateway {
			return fmt.Errorf("target: network %q has no gateway to kill", f.Target)
		}
	case FaultPrimaryKill, FaultCAUnreachable:
		return primary()
	case FaultAPIServerStop:
		if _, ok := t.Cluster(f.Target); !ok {
			return fmt.Errorf("target: unknown cluster %q (have %s)", f.Target, strings.Join(t.clusterNames(), ", "))
		}
	case FaultRootRotation:
		if f.Target != MeshTarget {
			return fmt.Errorf("target: a root rotation hits the whole mesh: want %q, got %q", MeshTarget, f.Target)
		}
		if f.Duration.Duration < 2*time.Second {
			return fmt.Errorf("duration: a root rotation needs at least 2s for its publish and reissue holds, got %s", f.Duration.Duration)
		}
	case "":
		return errors.New("kind: must not be empty")
	default:
		return fmt.Errorf("kind: unknown fault kind %q (want one of %s)", f.Kind, strings.Join(FaultKinds(), ", "))
	}
	return nil
}

func (t *Topology) clusterNames() []string {
	var names []string
	for _, c := range t.Clusters {
		names = append(names, c.Name)
	}
	return names
}

// RunLength is how long a run's load lasts: load.duration, or else until 15 s after the
// last fault ends (time for the "after" phase to show recovery), and at least 10 s.
func (t *Topology) RunLength() time.Duration {
	if d := t.Load.Duration.Duration; d > 0 {
		return d
	}
	end := time.Duration(0)
	for _, f := range t.Faults {
		end = max(end, f.End())
	}
	return max(end+15*time.Second, 10*time.Second)
}

// sortedFaults returns the faults by start time (then name), the order the scheduler
// applies them in.
func sortedFaults(fs []FaultSpec) []FaultSpec {
	out := slices.Clone(fs)
	slices.SortStableFunc(out, func(a, b FaultSpec) int {
		return cmp.Or(cmp.Compare(a.Start.Duration, b.Start.Duration), strings.Compare(a.Name, b.Name))
	})
	return out
}
