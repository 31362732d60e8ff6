package scenarios

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is the reachability matrix of a run: a cell per client cluster and service.
type Report struct {
	Scenario string `json:"scenario"`
	// Passed is true when every cell passed.
	Passed bool   `json:"passed"`
	Cells  []Cell `json:"cells"`
	// ControlPlanes says, by cluster, where its pods get their xDS and certificates
	// (Run.ControlPlaneOf).
	ControlPlanes map[string]string `json:"controlPlanes,omitempty"`
}

// Cell is what a client in one cluster saw of one service, against the expectation.
type Cell struct {
	From    string `json:"from"`
	Service string `json:"service"`
	// Mesh is the mesh whose service was called when not From's own: the call went to
	// its import name, <name>.<namespace>.svc.<mesh>.isthmus.
	Mesh string `json:"mesh,omitempty"`
	// Expected lists the clusters that must answer, each with the path it must take.
	Expected []Hop `json:"expected"`
	// Answered lists the clusters that answered, each with the path it took.
	Answered []Hop `json:"answered"`
	// ServerIdentities are the identities the servers presented; CallerIdentities the
	// client identities the servers saw.
	ServerIdentities []string `json:"serverIdentities,omitempty"`
	CallerIdentities []string `json:"callerIdentities,omitempty"`
	// Calls and Failed count the probe's calls.
	Calls  int `json:"calls"`
	Failed int `json:"failed"`
	// Errors are the distinct errors of failed calls.
	Errors []string `json:"errors,omitempty"`
	Passed bool     `json:"passed"`
	// Reasons say why the cell failed.
	Reasons []string `json:"reasons,omitempty"`
}

// Hop is a cluster and the path to it: "direct" or "gateway <network>".
type Hop struct {
	Cluster string `json:"cluster"`
	Path    string `json:"path"`
}

func (h Hop) String() string { return h.Cluster + " (" + h.Path + ")" }

// CheckOptions tunes Check.
type CheckOptions struct {
	// Timeout is how long a failing cell is retried while the mesh converges; default 60 s.
	Timeout time.Duration
	// Calls per probe; default 20.
	Calls int
	// Expect replaces the topology's expectations (e.g. what must hold after a fault).
	// Cells without an expectation expect every cluster that runs a replica and is
	// reachable: on the client's network, or behind a gateway.
	Expect []Expectation
}

// Check calls every service from the probe client of every cluster and compares the
// answers with the expectations. A cell is retried until it passes or the timeout passes;
// answers accumulate, so an endpoint that answered once counts. Check returns an error
// only when it could not ask the clients at all.
func (r *Run) Check(ctx context.Context, o CheckOptions) (*Report, error) {
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	if o.Calls == 0 {
		o.Calls = 20
	}
	expect := o.Expect
	if expect == nil {
		expect = r.Topology.Expect
	}
	rep := &Report{Scenario: r.Topology.Name, Passed: true, ControlPlanes: map[string]string{}}
	for _, c := range r.Topology.Clusters {
		rep.ControlPlanes[c.Name] = r.ControlPlaneOf(c.Name)
	}
	deadline := time.Now().Add(o.Timeout)
	for _, c := range r.Topology.Clusters {
		for _, w := range r.Topology.Workloads {
			service := w.Service + "." + w.Namespace
			if !r.Topology.inMeshOf(c.Name, w) {
				continue // no such service in the client's mesh: its cross-mesh cell below
			}
			cell, err := r.checkCell(ctx, c.Name, service, "", r.expected(expect, c.Name, service), o.Calls, deadline)
			if err != nil {
				return nil, err
			}
			rep.Passed = rep.Passed && cell.Passed
			rep.Cells = append(rep.Cells, *cell)
		}
		for _, x := range r.Topology.crossMeshCells(c.Name) {
			hops := r.expectedCross(expect, c.Name, x.Service, x.Mesh)
			calls := o.Calls
			if len(hops) == 0 {
				calls = min(calls, 3) // calls that must fail: each may wait for its deadline
			}
			cell, err := r.checkCell(ctx, c.Name, x.Service, x.Mesh, hops, calls, deadline)
			if err != nil {
				return nil, err
			}
			rep.Passed = rep.Passed && cell.Passed
			rep.Cells = append(rep.Cells, *cell)
		}
	}
	return rep, nil
}

// inMeshOf reports whether workload w has a Service in the mesh of cluster (always, for a
// topology of one mesh).
func (t *Topology) inMeshOf(cluster string, w WorkloadSpec) bool {
	for c := range w.Replicas {
		if t.sameMesh(c, cluster) {
			return true
		}
	}
	return false
}

// expectedCross returns the hops a client in from must see for service of another mesh:
// the explicit expectation's, or, when meshID exports service to from's mesh, every
// cluster of meshID running a replica on a network with a gateway, through that
// gateway's federation listener; else none.
func (r *Run) expectedCross(expect []Expectation, from, service, meshID string) []Hop {
	t := r.Topology
	var clusters []string
	explicit := false
	for _, e := range expect {
		if e.From == from && e.Service == service && e.Mesh == meshID {
			clusters, explicit = e.Reach, true
		}
	}
	if !explicit && t.ExportedTo(meshID, service, t.MeshOf(from).ID) {
		for _, w := range t.Workloads {
			if w.Service+"."+w.Namespace != service {
				continue
			}
			for _, c := range slices.Sorted(maps.Keys(w.Replicas)) {
				spec, _ := t.Cluster(c)
				if n, _ := t.Network(spec.Network); spec.Mesh == meshID && w.Replicas[c] > 0 && n.Gateway {
					clusters = append(clusters, c)
				}
			}
		}
	}
	var hops []Hop
	for _, c := range clusters {
		spec, _ := t.Cluster(c)
		hops = append(hops, Hop{Cluster: c, Path: "federation gateway " + spec.Network})
	}
	slices.SortFunc(hops, func(a, b Hop) int { return strings.Compare(a.Cluster, b.Cluster) })
	return hops
}

// expected returns the hops a client in from must see for service.
func (r *Run) expected(expect []Expectation, from, service string) []Hop {
	fromSpec, _ := r.Topology.Cluster(from)
	var clusters []string
	explicit := false
	for _, e := range expect {
		if e.From == from && e.Service == service && e.Mesh == "" {
			clusters, explicit = e.Reach, true
		}
	}
	if !explicit {
		for _, w := range r.Topology.Workloads {
			if w.Service+"."+w.Namespace != service {
				continue
			}
			for _, c := range slices.Sorted(maps.Keys(w.Replicas)) {
				spec, _ := r.Topology.Cluster(c)
				n, _ := r.Topology.Network(spec.Network)
				if w.Replicas[c] > 0 && spec.Mesh == fromSpec.Mesh && (spec.Network == fromSpec.Network || n.Gateway) {
					clusters = append(clusters, c)
				}
			}
		}
	}
	var hops []Hop
	for _, c := range clusters {
		spec, _ := r.Topology.Cluster(c)
		path := "direct"
		if spec.Network != fromSpec.Network {
			path = "gateway " + spec.Network
		}
		hops = append(hops, Hop{Cluster: c, Path: path})
	}
	slices.SortFunc(hops, func(a, b Hop) int { return strings.Compare(a.Cluster, b.Cluster) })
	return hops
}

func (r *Run) checkCell(ctx context.Context, from, service, meshID string, expected []Hop, calls int, deadline time.Time) (*Cell, error) {
	client, ok := r.Clients[from]
	if !ok {
		return nil, fmt.Errorf("scenarios: no probe client in %s", from)
	}
	host := Hostname(service)
	if meshID != "" {
		host = ImportHostname(service, meshID)
	}
	target := fmt.Sprintf("%s:%d", host, r.Topology.ServicePort(service))
	wantServers, wantCaller := r.expectedIdentities(from, service, meshID, expected)
	cell := &Cell{From: from, Service: service, Mesh: meshID, Expected: expected}
	answered := map[Hop]bool{}
	servers, callers, errs := map[string]bool{}, map[string]bool{}, map[string]bool{}
	for round := 0; ; round++ {
		res, err := probe(ctx, client.Addresses["admin"], target, calls)
		if err != nil {
			return nil, fmt.Errorf("scenarios: probe from %s: %w", from, err)
		}
		cell.Calls += len(res.Answers) + res.Failed
		cell.Failed += res.Failed
		for _, e := range res.Errors {
			errs[e] = true
		}
		for _, a := range res.Answers {
			answered[Hop{Cluster: a.Cluster, Path: r.pathOf(a.Peer)}] = true
			servers[a.ServerIdentity] = true
			callers[a.CallerIdentity] = true
		}
		cell.Answered = sortedHops(answered)
		cell.ServerIdentities, cell.CallerIdentities, cell.Errors = slices.Sorted(maps.Keys(servers)), slices.Sorted(maps.Keys(callers)), slices.Sorted(maps.Keys(errs))
		cell.Reasons = verdict(expected, cell.Answered, cell.ServerIdentities, cell.CallerIdentities, wantServers, wantCaller)
		// Two rounds at least, so that an endpoint still connecting gets its chance to
		// show up where it must not.
		if (len(cell.Reasons) == 0 && round >= 1) || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	cell.Passed = len(cell.Reasons) == 0
	if !cell.Passed && len(cell.Errors) > 0 {
		cell.Reasons = append(cell.Reasons, fmt.Sprintf("%d of %d calls failed, e.g. %s", cell.Failed, cell.Calls, cell.Errors[0]))
	}
	return cell, nil
}

// verdict lists why answered does not match expected, and identities that are wrong.
func verdict(expected, answered []Hop, servers, callers []string, wantServers []string, wantCaller string) []string {
	var reasons []string
	got := map[string]string{}
	for _, h := range answered {
		if prev, ok := got[h.Cluster]; ok {
			got[h.Cluster] = prev + ", " + h.Path
		} else {
			got[h.Cluster] = h.Path
		}
	}
	want := map[string]string{}
	for _, h := range expected {
		want[h.Cluster] = h.Path
		switch path, ok := got[h.Cluster]; {
		case !ok:
			reasons = append(reasons, fmt.Sprintf("%s did not answer (expected %s)", h.Cluster, h.Path))
		case path != h.Path:
			reasons = append(reasons, fmt.Sprintf("%s answered by %s, expected %s", h.Cluster, path, h.Path))
		}
	}
	for _, h := range answered {
		if _, ok := want[h.Cluster]; !ok {
			reasons = append(reasons, fmt.Sprintf("%s answered (%s) but is not expected to", h.Cluster, h.Path))
		}
	}
	for _, s := range servers {
		if !slices.Contains(wantServers, s) {
			reasons = append(reasons, fmt.Sprintf("server presented identity %q, expected one of %q", s, wantServers))
		}
	}
	for _, c := range callers {
		if c != wantCaller {
			reasons = append(reasons, fmt.Sprintf("server saw caller identity %q, expected %q (mTLS must hold end to end)", c, wantCaller))
		}
	}
	return reasons
}

// pathOf names the path of a connection by the address it went to.
func (r *Run) pathOf(peer string) string {
	for network, g := range r.Gateways {
		if g.Public.String() == peer {
			return "gateway " + network
		}
		if a := g.Addresses["federation"]; a != "" && a == peer {
			return "federation gateway " + network
		}
	}
	return "direct"
}

func sortedHops(m map[Hop]bool) []Hop {
	hops := make([]Hop, 0, len(m))
	for h := range m {
		hops = append(hops, h)
	}
	slices.SortFunc(hops, func(a, b Hop) int {
		if c := strings.Compare(a.Cluster, b.Cluster); c != 0 {
			return c
		}
		return strings.Compare(a.Path, b.Path)
	})
	return hops
}

// probe asks a workload's admin endpoint to call target.
func probe(ctx context.Context, admin, target string, calls int) (*ProbeResult, error) {
	u := "http://" + admin + "/probe?" + url.Values{"target": {target}, "calls": {fmt.Sprint(calls)}}.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Timeout: time.Duration(calls)*2*time.Second + 5*time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	var res ProbeResult
	if err := json.Unmarshal(body, &res); err != nil {
		return nil, fmt.Errorf("probe answer: %w", err)
	}
	return &res, nil
}

// WriteTable prints the report as a table: one row per cell, and the reasons of failed
// cells below it.
func (rep *Report) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tSERVICE\tEXPECTED\tANSWERED\tMTLS\tVERDICT")
	for _, c := range rep.Cells {
		mtls := "-"
		if len(c.ServerIdentities) > 0 && len(c.CallerIdentities) > 0 {
			mtls = "ok"
			for _, r := range c.Reasons {
				if strings.Contains(r, "identity") {
					mtls = "WRONG"
				}
			}
		}
		v := "PASS"
		if !c.Passed {
			v = "FAIL"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.From, c.label(), hops(c.Expected), hops(c.Answered), mtls, v)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, c := range rep.Cells {
		for _, r := range c.Reasons {
			fmt.Fprintf(w, "  %s → %s: %s\n", c.From, c.label(), r)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(rep.ControlPlanes)) {
		fmt.Fprintf(w, "  %s: xDS and certificates from the %s\n", name, rep.ControlPlanes[name])
	}
	if rep.Passed {
		_, err := fmt.Fprintf(w, "%s: every expectation holds (%d cells)\n", rep.Scenario, len(rep.Cells))
		return err
	}
	failed := 0
	for _, c := range rep.Cells {
		if !c.Passed {
			failed++
		}
	}
	_, err := fmt.Fprintf(w, "%s: %d of %d cells failed\n", rep.Scenario, failed, len(rep.Cells))
	return err
}

// label names the cell's service: "<name>.<ns>", or its import name for another mesh's.
func (c Cell) label() string {
	if c.Mesh != "" {
		return ImportHostname(c.Service, c.Mesh)
	}
	return c.Service
}

func hops(hs []Hop) string {
	if len(hs) == 0 {
		return "none"
	}
	s := make([]string, len(hs))
	for i, h := range hs {
		s[i] = h.String()
	}
	return strings.Join(s, ", ")
}
