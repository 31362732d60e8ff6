package scenarios

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
	"github.com/isthmus-mesh/isthmus/primary"
)

// TrafficSpec makes a traffic-management scenario: Istio configuration that every
// primary reads from its own cluster, and checks that measure what it does from the
// clients' side.
type TrafficSpec struct {
	// Config is Istio YAML (VirtualService, DestinationRule, ServiceEntry documents
	// separated by "---"), applied to the cluster of every primary: each primary reads
	// its configuration from its own cluster, and a network's gateway needs its
	// primary's subsets too.
	Config string `json:"config"`
	// Checks run in order, each on the clients' probes.
	Checks []TrafficCheck `json:"checks"`
}

// TrafficCheck is one measured behaviour: calls from one cluster's client to a service,
// with request headers, and what the answers must show.
type TrafficCheck struct {
	// Name says what the check proves.
	Name string `json:"name"`
	// From is the client's cluster; Service is "<name>.<namespace>".
	From    string `json:"from"`
	Service string `json:"service"`
	// Headers are sent with every call (the echo server also reads "sleep-ms").
	Headers map[string]string `json:"headers,omitempty"`
	// Calls is how many calls make the measurement; default 100, at most 1000.
	Calls int `json:"calls,omitempty"`
	// Share is each cluster's percentage of the answered calls, within Tolerance
	// percentage points (default 5); a cluster not named must not answer.
	Share     map[string]float64 `json:"share,omitempty"`
	Tolerance float64            `json:"tolerance,omitempty"`
	// MinFailed and MaxFailed bound the failed calls; MaxFailed defaults to 0 (to Calls
	// with Error).
	MinFailed int  `json:"minFailed,omitempty"`
	MaxFailed *int `json:"maxFailed,omitempty"`
	// Error, when set, is the gRPC code (e.g. "Unavailable") every call must fail with,
	// none slower than Within when that is set.
	Error  string   `json:"error,omitempty"`
	Within Duration `json:"within,omitzero"`
	// Failing names pods that fail every call while the check runs (healed after).
	Failing []string `json:"failing,omitempty"`
	// FailoverTo makes a failover check: Share holds first; then Failing fail and the
	// answers must move to FailoverTo within Within and stay there; then the pods heal
	// and Share must hold again within FailbackWithin.
	FailoverTo     string   `json:"failoverTo,omitempty"`
	FailbackWithin Duration `json:"failbackWithin,omitzero"`
}

// validateTraffic checks the traffic section and the workloads' labels.
func (t *Topology) validateTraffic(add func(string, ...any), clusters map[string]ClusterSpec, services map[string]WorkloadSpec) {
	pods := map[string]bool{}
	for i, w := range t.Workloads {
		for c, n := range w.Replicas {
			for k := range n {
				pods[fmt.Sprintf("%s-%s-%d", w.Service, c, k+1)] = true
			}
		}
		for _, c := range slices.Sorted(maps.Keys(w.Labels)) {
			if _, ok := clusters[c]; !ok {
				add("workloads[%d].labels: unknown cluster %q", i, c)
			}
			for k := range w.Labels[c] {
				if k == "app" || k == primary.LabelTLSMode {
					add("workloads[%d].labels[%s]: %q is set by the runner", i, c, k)
				}
			}
		}
	}
	tr := t.Traffic
	if tr == nil {
		return
	}
	if _, err := trafficObjects(tr.Config); err != nil {
		add("traffic.config: %v", err)
	}
	if len(tr.Checks) == 0 {
		add("traffic.checks: at least one check is required")
	}
	for i, c := range tr.Checks {
		f := fmt.Sprintf("traffic.checks[%d]", i)
		if c.Name == "" {
			add("%s.name: required", f)
		}
		if _, ok := clusters[c.From]; !ok {
			add("%s.from: unknown cluster %q", f, c.From)
		}
		if _, ok := services[c.Service]; !ok {
			add("%s.service: unknown service %q", f, c.Service)
		}
		if c.Calls < 0 || c.Calls > 1000 {
			add("%s.calls: %d is not between 1 and 1000", f, c.Calls)
		}
		for cl, pct := range c.Share {
			if _, ok := clusters[cl]; !ok {
				add("%s.share: unknown cluster %q", f, cl)
			}
			if pct < 0 || pct > 100 {
				add("%s.share[%s]: %v is not a percentage", f, cl, pct)
			}
		}
		if c.Error != "" && !slices.Contains(grpcCodeNames(), c.Error) {
			add("%s.error: %q is not a gRPC code name", f, c.Error)
		}
		for _, p := range c.Failing {
			if !pods[p] {
				add("%s.failing: no workload pod %q", f, p)
			}
		}
		if c.FailoverTo != "" {
			if _, ok := clusters[c.FailoverTo]; !ok {
				add("%s.failoverTo: unknown cluster %q", f, c.FailoverTo)
			}
			if len(c.Failing) == 0 || c.Within.Duration <= 0 || c.FailbackWithin.Duration <= 0 || len(c.Share) == 0 {
				add("%s: a failover check needs failing, share, within and failbackWithin", f)
			}
		}
	}
}

// grpcCodeNames are the names codes.Code prints.
func grpcCodeNames() []string {
	var out []string
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		out = append(out, c.String())
	}
	return out
}

// trafficObjects decodes the configuration into Istio objects.
func trafficObjects(config string) ([]any, error) {
	var out []any
	for i, doc := range strings.Split(config, "\n---") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		var obj any
		switch meta.Kind {
		case "VirtualService":
			obj = &networkingv1.VirtualService{}
		case "DestinationRule":
			obj = &networkingv1.DestinationRule{}
		case "ServiceEntry":
			obj = &networkingv1.ServiceEntry{}
		default:
			return nil, fmt.Errorf("document %d: kind %q is not VirtualService, DestinationRule or ServiceEntry", i, meta.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			return nil, fmt.Errorf("document %d (%s): %w", i, meta.Kind, err)
		}
		out = append(out, obj)
	}
	return out, nil
}

// TrafficReport is what the traffic checks measured.
type TrafficReport struct {
	Passed bool            `json:"passed"`
	Checks []TrafficResult `json:"checks"`
}

// TrafficResult is one check's measurement and verdict.
type TrafficResult struct {
	Name   string `json:"name"`
	From   string `json:"from"`
	Passed bool   `json:"passed"`
	// Measured says what the calls showed, e.g. "cluster-1 90.4%, cluster-2 9.6% of 1000".
	Measured string `json:"measured"`
	// Attempts counts measurements: a check is repeated while the configuration
	// converges, up to the timeout; the last measurement is the one reported.
	Attempts int      `json:"attempts"`
	Reasons  []string `json:"reasons,omitempty"`
}

// TrafficOptions tunes RunTraffic.
type TrafficOptions struct {
	// Timeout bounds each check's repetitions while the mesh converges; default 60 s.
	Timeout time.Duration
	// Progress receives a line per step; nil discards.
	Progress func(string)
}

// RunTraffic installs Istio's CRDs and the topology's traffic configuration on every
// primary's cluster, waits until each primary has applied every object, then runs the
// checks in order. It returns an error only when it cannot set up or ask the clients.
func (r *Run) RunTraffic(ctx context.Context, o TrafficOptions) (*TrafficReport, error) {
	tr := r.Topology.Traffic
	if tr == nil {
		return nil, fmt.Errorf("scenarios: %s has no traffic section", r.Topology.Name)
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	objs, err := trafficObjects(tr.Config)
	if err != nil {
		return nil, fmt.Errorf("scenarios: traffic config: %w", err)
	}
	for _, c := range r.Env.Clusters() {
		pc := r.Primaries[c.Name]
		if pc == nil {
			continue
		}
		progress(fmt.Sprintf("applying Istio's CRDs and %d traffic object(s) to %s", len(objs), c.Name))
		if err := istiocrd.Apply(ctx, c.REST); err != nil {
			return nil, err
		}
		ic, err := istioclient.NewForConfig(c.REST)
		if err != nil {
			return nil, fmt.Errorf("scenarios: istio client for %s: %w", c.Name, err)
		}
		fresh, _ := trafficObjects(tr.Config) // decoded per cluster: applying sets their resource versions
		for _, obj := range fresh {
			if err := applyIstio(ctx, ic, obj); err != nil {
				return nil, fmt.Errorf("scenarios: %s: %w", c.Name, err)
			}
		}
		if err := waitApplied(ctx, pc.Addresses["http"], len(objs), o.Timeout); err != nil {
			return nil, fmt.Errorf("scenarios: primary of %s: %w", c.Name, err)
		}
	}
	rep := &TrafficReport{Passed: true}
	for _, c := range tr.Checks {
		progress("traffic check: " + c.Name)
		res, err := r.runCheck(ctx, c, o.Timeout)
		if err != nil {
			return nil, err
		}
		rep.Checks = append(rep.Checks, *res)
		rep.Passed = rep.Passed && res.Passed
	}
	return rep, nil
}

// applyIstio creates obj, or updates it when it exists.
func applyIstio(ctx context.Context, ic istioclient.Interface, obj any) error {
	var err error
	switch o := obj.(type) {
	case *networkingv1.VirtualService:
		c := ic.NetworkingV1().VirtualServices(o.Namespace)
		if _, err = c.Create(ctx, o, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
			var cur *networkingv1.VirtualService
			if cur, err = c.Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = c.Update(ctx, o, metav1.UpdateOptions{})
			}
		}
	case *networkingv1.DestinationRule:
		c := ic.NetworkingV1().DestinationRules(o.Namespace)
		if _, err = c.Create(ctx, o, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
			var cur *networkingv1.DestinationRule
			if cur, err = c.Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = c.Update(ctx, o, metav1.UpdateOptions{})
			}
		}
	case *networkingv1.ServiceEntry:
		c := ic.NetworkingV1().ServiceEntries(o.Namespace)
		if _, err = c.Create(ctx, o, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
			var cur *networkingv1.ServiceEntry
			if cur, err = c.Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = c.Update(ctx, o, metav1.UpdateOptions{})
			}
		}
	case *networkingv1.Gateway:
		c := ic.NetworkingV1().Gateways(o.Namespace)
		if _, err = c.Create(ctx, o, metav1.CreateOptions{}); apierrors.IsAlreadyExists(err) {
			var cur *networkingv1.Gateway
			if cur, err = c.Get(ctx, o.Name, metav1.GetOptions{}); err == nil {
				o.ResourceVersion = cur.ResourceVersion
				_, err = c.Update(ctx, o, metav1.UpdateOptions{})
			}
		}
	default:
		return fmt.Errorf("applying %T: not an Istio kind the runner applies", obj)
	}
	if err != nil {
		return fmt.Errorf("applying %T: %w", obj, err)
	}
	return nil
}

// refusalGrace is how long an object may stay refused before waitApplied gives up on it:
// objects created together can reach a primary's watchers in either order, so a
// VirtualService may be refused for a moment until the DestinationRule it names arrives.
const refusalGrace = 5 * time.Second

// waitApplied polls a primary's /debug/configz until it lists n objects, all applied. An
// object still refused after refusalGrace fails the wait with the primary's reason.
func waitApplied(ctx context.Context, httpAddr string, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var refusedSince time.Time
	for {
		var cz primary.ConfigzResponse
		err := getJSON(ctx, "http://"+httpAddr+"/debug/configz", &cz)
		if err == nil {
			var applied []string
			var refused error
			for _, o := range cz.Objects {
				if !o.Applied {
					refused = fmt.Errorf("%s %s/%s refused: %s: %s", o.Kind, o.Namespace, o.Name, o.Reason, o.Message)
					break
				}
				applied = append(applied, o.Kind+" "+o.Namespace+"/"+o.Name)
			}
			if refused != nil {
				if refusedSince.IsZero() {
					refusedSince = time.Now()
				}
				if time.Since(refusedSince) >= refusalGrace {
					return refused
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			refusedSince = time.Time{}
			if len(applied) >= n {
				return nil
			}
			err = fmt.Errorf("%d of %d objects applied (%s)", len(applied), n, strings.Join(applied, ", "))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("traffic configuration not applied after %s: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func getJSON(ctx context.Context, u string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", resp.Status, bytes.TrimSpace(body))
	}
	return json.Unmarshal(body, into)
}

// setFailing makes the named pods fail (or stop failing) every call.
func (r *Run) setFailing(ctx context.Context, pods []string, on bool) error {
	for _, name := range pods {
		i := slices.IndexFunc(r.Workloads, func(c *Component) bool { return c.Name == name })
		if i < 0 {
			return fmt.Errorf("scenarios: no workload pod %q", name)
		}
		u := fmt.Sprintf("http://%s/fail?on=%v", r.Workloads[i].Addresses["admin"], on)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return err
		}
		resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
		if err != nil {
			return fmt.Errorf("scenarios: %s /fail: %w", name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("scenarios: %s /fail: %s", name, resp.Status)
		}
	}
	return nil
}

// probeWith asks the client of from to call service with the check's headers; until,
// when set, stops at the first answer from that cluster or after within.
func (r *Run) probeWith(ctx context.Context, c TrafficCheck, calls int, until string, within time.Duration) (*ProbeResult, time.Duration, error) {
	client := r.Clients[c.From]
	if client == nil {
		return nil, 0, fmt.Errorf("scenarios: no probe client in %s", c.From)
	}
	q := url.Values{"target": {fmt.Sprintf("%s.svc.cluster.local:%d", c.Service, r.Topology.ServicePort(c.Service))}, "calls": {fmt.Sprint(calls)}}
	for _, k := range slices.Sorted(maps.Keys(c.Headers)) {
		q.Add("header", k+":"+c.Headers[k])
	}
	if until != "" {
		q.Set("until", until)
		q.Set("within", within.String())
	}
	var res ProbeResult
	start := time.Now()
	if err := getJSONTimeout(ctx, "http://"+client.Addresses["admin"]+"/probe?"+q.Encode(), &res, time.Duration(calls)*2*time.Second+within+5*time.Second); err != nil {
		return nil, 0, fmt.Errorf("scenarios: probe from %s: %w", c.From, err)
	}
	return &res, time.Since(start), nil
}

func getJSONTimeout(ctx context.Context, u string, into any, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return getJSON(ctx, u, into)
}

// runCheck measures one check, repeating it while it fails until timeout (failover
// checks, which change the mesh, run once).
func (r *Run) runCheck(ctx context.Context, c TrafficCheck, timeout time.Duration) (*TrafficResult, error) {
	res := &TrafficResult{Name: c.Name, From: c.From}
	if c.Calls == 0 {
		c.Calls = 100
	}
	if c.Tolerance == 0 {
		c.Tolerance = 5
	}
	if err := r.setFailing(ctx, c.Failing, true); err != nil {
		return nil, err
	}
	defer r.setFailing(context.WithoutCancel(ctx), c.Failing, false)
	if c.FailoverTo != "" {
		return res, r.failover(ctx, c, res)
	}
	deadline := time.Now().Add(timeout)
	for {
		res.Attempts++
		p, _, err := r.probeWith(ctx, c, c.Calls, "", 0)
		if err != nil {
			return nil, err
		}
		res.Measured, res.Reasons = judgeCalls(c, p)
		res.Passed = len(res.Reasons) == 0
		if res.Passed || time.Now().After(deadline) {
			return res, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// judgeCalls compares one probe's calls with the check.
func judgeCalls(c TrafficCheck, p *ProbeResult) (string, []string) {
	var reasons []string
	byCluster := map[string]int{}
	for _, a := range p.Answers {
		byCluster[a.Cluster]++
	}
	total := len(p.Answers) + p.Failed
	var parts []string
	for _, cl := range slices.Sorted(maps.Keys(byCluster)) {
		parts = append(parts, fmt.Sprintf("%s %.1f%%", cl, 100*float64(byCluster[cl])/float64(max(len(p.Answers), 1))))
	}
	measured := fmt.Sprintf("%s answered of %d calls, %d failed", strings.Join(parts, ", "), total, p.Failed)
	if len(p.Codes) > 0 {
		var cs []string
		for _, k := range slices.Sorted(maps.Keys(p.Codes)) {
			cs = append(cs, fmt.Sprintf("%s×%d", k, p.Codes[k]))
		}
		measured += " (" + strings.Join(cs, ", ") + ")"
	}
	measured += fmt.Sprintf(", slowest %d ms", p.SlowestMS)
	maxFailed := 0
	if c.Error != "" {
		maxFailed = total
	}
	if c.MaxFailed != nil {
		maxFailed = *c.MaxFailed
	}
	if p.Failed > maxFailed {
		reasons = append(reasons, fmt.Sprintf("%d calls failed; at most %d may (%v)", p.Failed, maxFailed, p.Errors))
	}
	if p.Failed < c.MinFailed {
		reasons = append(reasons, fmt.Sprintf("%d calls failed; at least %d must", p.Failed, c.MinFailed))
	}
	if c.Error != "" && p.Codes[c.Error] != total {
		reasons = append(reasons, fmt.Sprintf("%d of %d calls failed with %s", p.Codes[c.Error], total, c.Error))
	}
	if w := c.Within.Duration; w > 0 && time.Duration(p.SlowestMS)*time.Millisecond > w {
		reasons = append(reasons, fmt.Sprintf("the slowest call took %d ms; want within %s", p.SlowestMS, w))
	}
	if len(c.Share) > 0 {
		for _, cl := range slices.Sorted(maps.Keys(byCluster)) {
			if _, ok := c.Share[cl]; !ok {
				reasons = append(reasons, fmt.Sprintf("%s answered %d calls but is not expected to", cl, byCluster[cl]))
			}
		}
		for _, cl := range slices.Sorted(maps.Keys(c.Share)) {
			got := 100 * float64(byCluster[cl]) / float64(max(len(p.Answers), 1))
			if math.Abs(got-c.Share[cl]) > c.Tolerance {
				reasons = append(reasons, fmt.Sprintf("%s answered %.1f%%; want %.0f%% ± %.0f", cl, got, c.Share[cl], c.Tolerance))
			}
		}
	}
	return measured, reasons
}

// failover measures a failover check (see TrafficCheck.FailoverTo).
func (r *Run) failover(ctx context.Context, c TrafficCheck, res *TrafficResult) error {
	// The check's pods were set failing by runCheck; heal them to measure "before".
	if err := r.setFailing(ctx, c.Failing, false); err != nil {
		return err
	}
	home := ""
	for cl, pct := range c.Share {
		if pct >= 50 {
			home = cl
		}
	}
	fail := func(reason string, args ...any) error {
		res.Reasons = append(res.Reasons, fmt.Sprintf(reason, args...))
		return nil
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		res.Attempts++
		p, _, err := r.probeWith(ctx, c, c.Calls, "", 0)
		if err != nil {
			return err
		}
		m, reasons := judgeCalls(c, p)
		if len(reasons) == 0 {
			res.Measured = "before: " + m
			break
		}
		if time.Now().After(deadline) {
			res.Measured = "before: " + m
			return fail("before the failure: %s", strings.Join(reasons, "; "))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err := r.setFailing(ctx, c.Failing, true); err != nil {
		return err
	}
	p, took, err := r.probeWith(ctx, c, 1000, c.FailoverTo, c.Within.Duration)
	if err != nil {
		return err
	}
	moved := slices.ContainsFunc(p.Answers, func(a Answer) bool { return a.Cluster == c.FailoverTo })
	res.Measured += fmt.Sprintf("; moved to %s after %s (%d calls failed meanwhile)", c.FailoverTo, took.Round(10*time.Millisecond), p.Failed)
	if !moved {
		return fail("no call reached %s within %s after %v began failing", c.FailoverTo, c.Within.Duration, c.Failing)
	}
	after, _, err := r.probeWith(ctx, c, 50, "", 0)
	if err != nil {
		return err
	}
	stay := TrafficCheck{Share: map[string]float64{c.FailoverTo: 100}, Tolerance: 0}
	if m, reasons := judgeCalls(stay, after); len(reasons) > 0 {
		return fail("after failover: %s (%s)", strings.Join(reasons, "; "), m)
	}
	if err := r.setFailing(ctx, c.Failing, false); err != nil {
		return err
	}
	back, took, err := r.probeWith(ctx, c, 1000, home, c.FailbackWithin.Duration)
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(back.Answers, func(a Answer) bool { return a.Cluster == home }) {
		return fail("calls did not come back to %s within %s of healing", home, c.FailbackWithin.Duration)
	}
	res.Measured += fmt.Sprintf("; back in %s %s after healing", home, took.Round(10*time.Millisecond))
	final, _, err := r.probeWith(ctx, c, c.Calls, "", 0)
	if err != nil {
		return err
	}
	if m, reasons := judgeCalls(c, final); len(reasons) > 0 {
		return fail("after failback: %s (%s)", strings.Join(reasons, "; "), m)
	}
	res.Passed = true
	return nil
}

// WriteTable prints the checks, one row each, and the reasons of failed ones.
func (rep *TrafficReport) WriteTable(w io.Writer) error {
	fmt.Fprintln(w, "TRAFFIC CHECK\tFROM\tRESULT\tMEASURED")
	for _, c := range rep.Checks {
		verdict := "ok"
		if !c.Passed {
			verdict = "FAIL"
		}
		m := c.Measured
		if c.Attempts > 1 {
			m += fmt.Sprintf(" (measurement %d)", c.Attempts)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", c.Name, c.From, verdict, m)
		for _, r := range c.Reasons {
			fmt.Fprintf(w, "\t\t\t  - %s\n", r)
		}
	}
	return nil
}
