package scenarios_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/internal/proc"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/scenarios"
	"github.com/isthmus-mesh/isthmus/trust"
)

// freshProbe calls service from a cluster's client on a new channel (so every endpoint
// gets a new handshake) and counts answers and failures by answering cluster.
func freshProbe(t *testing.T, r *scenarios.Run, from string, calls int) (answers map[string]int, failed int, errs []string) {
	t.Helper()
	q := url.Values{"target": {"echo.demo.svc.cluster.local:8080"}, "calls": {fmt.Sprint(calls)}, "fresh": {"1"}}
	resp, err := http.Get("http://" + r.Clients[from].Addresses["admin"] + "/probe?" + q.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var res scenarios.ProbeResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		t.Fatal(err)
	}
	answers = map[string]int{}
	for _, a := range res.Answers {
		answers[a.Cluster]++
	}
	return answers, res.Failed, res.Errors
}

// untilProbe calls service from a cluster's client on a new channel until cluster answers
// or within has passed (the workload's /probe?until=).
func untilProbe(t *testing.T, r *scenarios.Run, from, cluster string, within time.Duration) scenarios.ProbeResult {
	t.Helper()
	q := url.Values{"target": {"echo.demo.svc.cluster.local:8080"}, "calls": {"1000"}, "fresh": {"1"}, "until": {cluster}, "within": {within.String()}}
	resp, err := http.Get("http://" + r.Clients[from].Addresses["admin"] + "/probe?" + q.Encode())
	if err != nil {
		t.Error(err)
		return scenarios.ProbeResult{}
	}
	defer resp.Body.Close()
	var res scenarios.ProbeResult
	if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
		t.Error(err)
	}
	return res
}

// certFailure reports whether a call's error is a refused handshake: a certificate one
// side did not accept. Other errors (a connection closed by a stopping channel) are not.
func certFailure(e string) bool {
	for _, s := range []string{"tls:", "x509:", "certificate", "authentication handshake failed"} {
		if strings.Contains(e, s) {
			return true
		}
	}
	return false
}

// pids returns the PIDs of the run's workloads and clients.
func pids(r *scenarios.Run) []int {
	var out []int
	for _, c := range r.Workloads {
		out = append(out, c.PID)
	}
	for _, c := range r.Clients {
		out = append(out, c.PID)
	}
	slices.Sort(out)
	return out
}

// TestMultiTrust runs the multi-trust scenario (two roots, two trust domains, federated
// through the primaries' bundle endpoints), then removes cluster-1's federation with
// cluster-2's domain: cross-domain handshakes fail within one refresh interval while
// same-domain calls keep working; adding it back restores them. No workload restarts.
func TestMultiTrust(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-trust runs on two networks, which need network namespaces, so root (CI runs as root)")
	}
	r := up(t, "multi-trust", p)
	rep := check(t, r, scenarios.CheckOptions{})
	if !rep.Passed {
		t.Fatal("multi-trust failed")
	}
	c1 := cell(t, rep, "cluster-1", "echo.demo")
	if fmt.Sprint(c1.ServerIdentities) != "[spiffe://east.example/ns/demo/sa/echo spiffe://west.example/ns/demo/sa/echo]" ||
		fmt.Sprint(c1.CallerIdentities) != "[spiffe://east.example/ns/clients/sa/client]" {
		t.Errorf("cluster-1's identities: servers %v, caller seen %v", c1.ServerIdentities, c1.CallerIdentities)
	}
	c2 := cell(t, rep, "cluster-2", "echo.demo")
	if fmt.Sprint(c2.CallerIdentities) != "[spiffe://west.example/ns/clients/sa/client]" {
		t.Errorf("cluster-1's server saw cluster-2's caller as %v; want its west.example identity", c2.CallerIdentities)
	}
	if fmt.Sprint(c1.Answered) != "[cluster-1 (direct) cluster-2 (gateway network-2)]" {
		t.Errorf("cluster-1's answers %v; want cluster-2 through network-2's gateway", c1.Answered)
	}

	// Each primary reports its peer on trustz: fetched, with a sequence.
	for from, peer := range map[string]string{"cluster-1": "west.example", "cluster-2": "east.example"} {
		var doc struct {
			Federation struct {
				Peers []struct {
					TrustDomain, State string
					Sequence           uint64
				}
			}
		}
		resp, err := http.Get("http://" + r.Primaries[from].Addresses["http"] + "/debug/trustz")
		if err != nil {
			t.Fatal(err)
		}
		json.NewDecoder(resp.Body).Decode(&doc)
		resp.Body.Close()
		if len(doc.Federation.Peers) != 1 || doc.Federation.Peers[0].TrustDomain != peer || doc.Federation.Peers[0].State != "ok" || doc.Federation.Peers[0].Sequence < 1 {
			t.Errorf("%s trustz peers: %+v; want %s ok", from, doc.Federation.Peers, peer)
		}
	}

	// New handshakes reach both domains before the change (a fresh channel's first calls
	// may all go to the endpoint that connected first, so this polls).
	both := func(from string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			a, f, errs := freshProbe(t, r, from, 40)
			if a["cluster-1"] > 0 && a["cluster-2"] > 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("fresh probes from %s do not reach both clusters: %v (%d failed, %v)", from, a, f, errs)
			}
		}
	}
	both("cluster-1")
	both("cluster-2")

	before := pids(r)
	ctx := context.Background()
	// The end of the federation: cluster-1 no longer trusts west.example.
	start := time.Now()
	if err := r.Unfederate(ctx, "cluster-1", "cluster-2"); err != nil {
		t.Fatal(err)
	}
	// grpc-go's file_watcher re-reads the bundle map every 5 s; the store change reaches
	// the workloads' agents at once. One refresh interval, with room for a loaded machine.
	const refresh = 5 * time.Second
	var cut, cut1, cut2 time.Duration
	for {
		a1, f1, e1 := freshProbe(t, r, "cluster-1", 40)
		a2, f2, _ := freshProbe(t, r, "cluster-2", 40)
		if a1["cluster-2"] == 0 && cut1 == 0 {
			cut1 = time.Since(start) // cluster-1's client: grpc-go re-read the bundle map
		}
		if a2["cluster-1"] == 0 && cut2 == 0 {
			cut2 = time.Since(start) // cluster-1's server: verifies callers with the store's bundles
		}
		// cluster-1's client refuses west's servers; cluster-1's server refuses west's
		// caller; east → east and west → west go on.
		// A fresh channel's balancer sends calls only to endpoints whose handshake
		// succeeded, so a refused domain shows as no answers from it.
		if a1["cluster-2"] == 0 && a2["cluster-1"] == 0 {
			if a1["cluster-1"] == 0 || a2["cluster-2"] == 0 {
				t.Fatalf("same-domain calls stopped too: cluster-1 %v (%d failed), cluster-2 %v (%d failed)", a1, f1, a2, f2)
			}
			cut = time.Since(start)
			t.Logf("cross-domain handshakes refused %.1fs after the relationship went (cluster-1's client %.1fs, its server %.1fs; e.g. %v); same-domain answers %v, %v",
				cut.Seconds(), cut1.Seconds(), cut2.Seconds(), e1, a1, a2)
			break
		}
		if time.Since(start) > 2*refresh+5*time.Second {
			t.Fatalf("cross-domain calls still work %s after the federation was removed: cluster-1 %v (%d failed), cluster-2 %v (%d failed)", time.Since(start), a1, f1, a2, f2)
		}
	}
	if cut > refresh+3*time.Second {
		t.Errorf("took %s to refuse cross-domain handshakes; want within one refresh interval (%s)", cut, refresh)
	}

	// Back again: the relationship restores cross-domain calls.
	start = time.Now()
	if err := r.Federate(ctx, "cluster-1", "cluster-2"); err != nil {
		t.Fatal(err)
	}
	for {
		a1, f1, errs := freshProbe(t, r, "cluster-1", 40)
		a2, _, _ := freshProbe(t, r, "cluster-2", 40)
		if a1["cluster-2"] > 0 && a2["cluster-1"] > 0 {
			t.Logf("new cross-domain handshakes succeed again %.1fs after the relationship was added back", time.Since(start).Seconds())
			break
		}
		if time.Since(start) > 2*refresh+20*time.Second {
			t.Fatalf("fresh handshakes still fail after federating again: %v (%d failed, %v), %v", a1, f1, errs, a2)
		}
	}
	for _, pid := range before {
		if !proc.PIDMatches(pid, "") {
			t.Errorf("workload process %d is gone: a workload restarted", pid)
		}
	}
	if after := pids(r); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("workload processes changed: %v → %v", before, after)
	}
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("multi-trust fails after federating again")
	}
}

// TestMultiTrustRotation rotates west.example's root (cluster-2) with trust.Rotate while
// cluster-1's client keeps opening new connections to echo in both clusters (a fresh
// channel per probe, every ~100 ms): the new root is published to cluster-1 ahead of use —
// each phase waits until cluster-1's primary holds west.example's new bundle, then holds —
// so no probe fails: every fresh channel reaches cluster-2 within a bound, no call fails
// on a certificate and every server answers with its own identity. Workload certificates
// live 10 s, so leaves renew under the new chain within the holds. The same probes run
// first without a rotation, as the baseline of a loaded machine. (Without the holds —
// Publish and Reissue 0, 60 s certificates — probes lose cluster-2 after the retirement.)
func TestMultiTrustRotation(t *testing.T) {
	p := provider(t)
	if os.Geteuid() != 0 {
		t.Skip("multi-trust runs on two networks, which need network namespaces, so root (CI runs as root)")
	}
	top, err := scenarios.Builtin("multi-trust")
	if err != nil {
		t.Fatal(err)
	}
	top.Tuning.CertTTL = scenarios.Duration{Duration: 10 * time.Second}
	ctx := context.Background()
	r, err := scenarios.Up(ctx, top, p, scenarios.Options{Dir: t.TempDir(), Progress: func(s string) { t.Log(s) }})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("multi-trust failed before the rotation")
	}
	client := &http.Client{Timeout: 5 * time.Second}
	trustz := func(cluster string) (*trustzDoc, error) {
		resp, err := client.Get("http://" + r.Primaries[cluster].Addresses["http"] + "/debug/trustz")
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		var d trustzDoc
		return &d, json.NewDecoder(resp.Body).Decode(&d)
	}
	// Each probe opens a new channel from cluster-1's client and calls until cluster-2
	// answers, within a bound: a handshake through the gateway on a fresh channel can be
	// slower than forty direct calls, but not than seconds. A probe fails when cluster-2
	// does not answer within the bound (its handshake was refused: a refused endpoint
	// takes no calls, so it shows as silence), when any call fails on a certificate, or
	// when a server answers with another identity than its cluster's.
	const within = 3 * time.Second
	wantID := map[string]string{"cluster-1": "spiffe://east.example/ns/demo/sa/echo", "cluster-2": "spiffe://west.example/ns/demo/sa/echo"}
	var probes, slowest, over40 int
	var failures []string
	probe := func(at time.Duration) {
		t0 := time.Now()
		res := untilProbe(t, r, "cluster-1", "cluster-2", within)
		took := time.Since(t0)
		probes++
		slowest = max(slowest, int(took.Milliseconds()))
		var why []string
		reached := false
		for i, a := range res.Answers {
			if a.Cluster == "cluster-2" && !reached && i+res.Failed >= 40 {
				over40++ // forty calls on a fresh channel would not have reached it
			}
			reached = reached || a.Cluster == "cluster-2"
			if a.ServerIdentity != wantID[a.Cluster] {
				why = append(why, fmt.Sprintf("%s answered as %q", a.Cluster, a.ServerIdentity))
			}
		}
		if !reached {
			why = append(why, fmt.Sprintf("no answer from cluster-2 within %s", within))
		}
		for _, e := range res.Errors {
			if certFailure(e) {
				why = append(why, e)
			}
		}
		if len(why) > 0 {
			failures = append(failures, fmt.Sprintf("%.1fs: %v", at.Seconds(), why))
		}
	}
	// The baseline: the same probes without a rotation, what a loaded machine costs.
	start := time.Now()
	for time.Since(start) < 5*time.Second {
		probe(time.Since(start))
	}
	t.Logf("baseline: %d fresh probes in %.1fs, slowest to reach cluster-2 %d ms (%d after 40 calls or more), %d failed: %v", probes, time.Since(start).Seconds(), slowest, over40, len(failures), failures)
	if len(failures) > 0 {
		t.Fatalf("fresh probes fail before the rotation: %v", failures)
	}
	probes, slowest, over40 = 0, 0, 0
	stop := make(chan struct{})
	done := make(chan struct{})
	start = time.Now()
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			probe(time.Since(start))
		}
	}()
	cfg := trust.RotationConfig{
		Stores:    []trust.CAStore{trust.DirStore{ID: "cluster-2", Dir: r.CADirs["cluster-2"]}},
		StateFile: filepath.Join(t.TempDir(), "rotation.json"),
		// Leaves renew at half of 10 s; grpc-go re-reads them and the bundle map every
		// scenarios.FileRefresh(10 s) = 1 s.
		Publish: 12 * time.Second, Reissue: 12 * time.Second, CheckTimeout: time.Minute,
		Status: func(ctx context.Context, _ mesh.ClusterID) (trust.TrustStatus, error) {
			return trust.FetchStatus(ctx, client, "http://"+r.Primaries["cluster-2"].Addresses["http"]+"/debug/trustz")
		},
		Peers: []string{"cluster-1"},
		PeerRoots: func(_ context.Context, peer string, td mesh.TrustDomain) ([]string, error) {
			d, err := trustz(peer)
			if err != nil {
				return nil, err
			}
			for _, p := range d.Federation.Peers {
				if p.TrustDomain == string(td) {
					return p.Roots, nil
				}
			}
			return nil, fmt.Errorf("%s does not federate with %s", peer, td)
		},
		Progress: func(s string) { t.Log(s) },
	}
	if err := trust.Rotate(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(6 * time.Second) // calls go on after the old root is retired everywhere
	close(stop)
	<-done
	t.Logf("rotation of west.example in %.1fs: %d fresh probes from cluster-1, slowest to reach cluster-2 %d ms (%d after 40 calls or more), %d failed", time.Since(start).Seconds(), probes, slowest, over40, len(failures))
	if len(failures) != 0 {
		t.Errorf("%d of %d fresh probes failed during the rotation: %v", len(failures), probes, failures)
	}
	if rep := check(t, r, scenarios.CheckOptions{}); !rep.Passed {
		t.Fatal("multi-trust fails after the rotation")
	}
	d, err := trustz("cluster-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Federation.Peers) != 1 || len(d.Federation.Peers[0].Roots) != 1 {
		t.Errorf("cluster-1 holds %+v for west.example after the retirement; want the new root alone", d.Federation.Peers)
	}
}

// trustzDoc is the part of a primary's /debug/trustz these tests read.
type trustzDoc struct {
	Federation struct {
		Peers []struct {
			TrustDomain, State string
			Sequence           uint64
			Roots              []string
		}
	}
}
