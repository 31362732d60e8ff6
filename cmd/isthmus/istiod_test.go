package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/isthmus-mesh/isthmus/internal/istiobin"
	"github.com/isthmus-mesh/isthmus/internal/kubebin"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal"
	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/remote"
)

// auditEvent is the part of a kube-apiserver audit event (audit.k8s.io/v1 Event) the
// test reads.
type auditEvent struct {
	Stage string `json:"stage"`
	Verb  string `json:"verb"`
	User  struct {
		Username string `json:"username"`
	} `json:"user"`
	ObjectRef *struct {
		Resource    string `json:"resource"`
		Namespace   string `json:"namespace"`
		APIGroup    string `json:"apiGroup"`
		Subresource string `json:"subresource"`
	} `json:"objectRef"`
	RequestURI     string `json:"requestURI"`
	ResponseStatus *struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
}

// request is one kind of API request: verb on group/resource in namespace ns ("" for
// every namespace or a cluster-scoped kind).
type request struct{ verb, group, resource, ns string }

func (r request) String() string {
	if r.ns == "" {
		return r.verb + " " + r.group + "/" + r.resource
	}
	return r.verb + " " + r.group + "/" + r.resource + " in " + r.ns
}

// readAudit returns the resource requests user made, as recorded in the audit log at
// path, split into those allowed and those refused (403).
func readAudit(t *testing.T, path, user string) (allowed, refused map[request]int) {
	t.Helper()
	allowed, refused = map[request]int{}, map[request]int{}
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return allowed, refused
	} else if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e auditEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			continue // a line being written
		}
		if e.User.Username != user || e.ObjectRef == nil || e.ResponseStatus == nil {
			continue
		}
		r := request{e.Verb, e.ObjectRef.APIGroup, e.ObjectRef.Resource, e.ObjectRef.Namespace}
		if e.ObjectRef.Subresource != "" {
			r.resource += "/" + e.ObjectRef.Subresource
		}
		if e.ResponseStatus.Code == http.StatusForbidden {
			refused[r]++
		} else {
			allowed[r]++
		}
	}
	return allowed, refused
}

// grants reports whether rules allow r.
func grants(rules []rbacv1.PolicyRule, r request) bool {
	for _, rule := range rules {
		if (slices.Contains(rule.APIGroups, r.group) || slices.Contains(rule.APIGroups, "*")) &&
			(slices.Contains(rule.Resources, r.resource) || slices.Contains(rule.Resources, "*")) &&
			(slices.Contains(rule.Verbs, r.verb) || slices.Contains(rule.Verbs, "*")) {
			return true
		}
	}
	return false
}

// startIstiod runs Istio's control plane as users run it (`pilot-discovery discovery`,
// POD_NAMESPACE=istio-system) against the cluster of kubeconfig, every listener on a free
// loopback port, and waits for its readiness endpoint. It returns the HTTP (debug)
// address and the log path.
func startIstiod(t *testing.T, set *istiobin.Set, kubeconfig, clusterID string) (string, string) {
	t.Helper()
	httpAddr := freeAddr(t)
	dir := t.TempDir()
	logPath := filepath.Join(dir, "istiod.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(set.Path(istiobin.Discovery), "discovery",
		"--kubeconfig", kubeconfig, "--clusterID", clusterID, "--domain", "cluster.local",
		"--httpAddr", httpAddr, "--grpcAddr", freeAddr(t), "--secureGRPCAddr", freeAddr(t),
		"--monitoringAddr", freeAddr(t), "--httpsAddr", freeAddr(t),
		"--ctrlz_address", "127.0.0.1", "--ctrlz_port", portOf(t, freeAddr(t)),
		"--meshConfig", filepath.Join(dir, "mesh"), "--networksConfig", filepath.Join(dir, "meshNetworks"),
		"--shutdownDuration", "1s")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "POD_NAMESPACE=istio-system", "POD_NAME=istiod-test", "HOME="+dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
	})
	eventually(t, 60*time.Second, "istiod ready", func() error {
		if cmd.ProcessState != nil {
			return fmt.Errorf("istiod exited:\n%s", tail(string(mustRead(t, logPath)), 40))
		}
		resp, err := http.Get("http://" + httpAddr + "/ready")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/ready: %s\n%s", resp.Status, tail(string(mustRead(t, logPath)), 20))
		}
		return nil
	})
	return httpAddr, logPath
}

func portOf(t *testing.T, addr string) string {
	t.Helper()
	return addr[strings.LastIndexByte(addr, ':')+1:]
}

// TestIstiodSyncsFromIsthmusRemoteSecret is the second interop direction: Istio's istiod,
// running in c-1, discovers c-2 through a secret made by `isthmus remote-secret create`.
// With the default (Isthmus) rights its reader is refused what istiod watches beyond an
// Isthmus primary; with --rights istio it syncs, proven on istiod's own debug endpoints:
// /debug/registryz lists the remote's Service with c-2's ClusterIP and
// /debug/endpointShardz holds the remote Pod's address in c-2's shard. c-2's API server
// audits every request of both readers, so the test also shows that the rights are
// exactly what istiod uses: each of its requests is granted, none refused, none is a
// write or a single get, and each rule --rights istio adds is one istiod used.
func TestIstiodSyncsFromIsthmusRemoteSecret(t *testing.T) {
	set := istioPeers(t)
	bins, err := kubetest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	policy := filepath.Join(dir, "audit-policy.yaml")
	auditLog := filepath.Join(dir, "c-2-audit.log")
	const (
		isthmusReader = "system:serviceaccount:istio-system:" + remote.DefaultServiceAccount
		istiodReader  = "system:serviceaccount:istio-system:istiod-reader"
	)
	if err := os.WriteFile(policy, []byte(`apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  users: ["`+isthmusReader+`", "`+istiodReader+`"]
- level: None
`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfgs := kubetest.Configs(bins, dir, "c", 2)
	cfgs[1].ExtraAPIServerArgs = []string{"--audit-policy-file=" + policy, "--audit-log-path=" + auditLog}
	clusters, err := kubelocal.StartMany(context.Background(), cfgs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range clusters {
			c.Stop()
		}
	})
	bin := buildIsthmus(t)
	c1, err := clusters[0].Client()
	if err != nil {
		t.Fatal(err)
	}
	c2, err := clusters[1].Client()
	if err != nil {
		t.Fatal(err)
	}
	ensureNamespace(t, c1, "istio-system")
	if out, err := exec.Command(bins.Path(kubebin.Kubectl), "--kubeconfig", clusters[0].Kubeconfig,
		"apply", "--server-side", "-f", set.Path(istiobin.CRDs)).CombinedOutput(); err != nil {
		t.Fatalf("apply Istio's CRDs: %v\n%s", err, tail(string(out), 20))
	}
	remoteIP := addEcho(t, c2)
	httpAddr, logPath := startIstiod(t, set, clusters[0].Kubeconfig, "c-1")
	istiodLog := func() string { return tail(string(mustRead(t, logPath)), 40) }

	// Default rights: istiod connects but its reader is refused what it needs.
	stdout, stderr, err := run(t, bin, "remote-secret", "create", "--kubeconfig", clusters[1].Kubeconfig, "--name", "c-2")
	if err != nil {
		t.Fatalf("remote-secret create: %v\n%s", err, stderr)
	}
	applySecret(t, c1, parseSecret(t, stdout))
	eventually(t, 60*time.Second, "istiod's requests with the Isthmus reader refused", func() error {
		_, refused := readAudit(t, auditLog, isthmusReader)
		for _, r := range []request{{"list", "", "configmaps", "istio-system"}, {"list", "", "secrets", ""}, {"list", "apiextensions.k8s.io", "customresourcedefinitions", ""}} {
			if refused[r] == 0 {
				return fmt.Errorf("no refused %s yet (refused: %v)\n%s", r, refused, istiodLog())
			}
		}
		return nil
	})

	// --rights istio, for a reader of its own: the same secret name, so istiod swaps the
	// credential.
	stdout, stderr, err = run(t, bin, "remote-secret", "create", "--kubeconfig", clusters[1].Kubeconfig, "--name", "c-2",
		"--rights", "istio", "--service-account", "istiod-reader")
	if err != nil {
		t.Fatalf("remote-secret create --rights istio: %v\n%s", err, stderr)
	}
	applySecret(t, c1, parseSecret(t, stdout))
	eventually(t, 90*time.Second, "istiod's registry holds echo from c-2", func() error {
		var services []struct {
			Hostname    string `json:"hostname"`
			ClusterVIPs struct {
				Addresses map[string][]string `json:"Addresses"`
			} `json:"clusterVIPs"`
		}
		if err := getJSON("http://"+httpAddr+"/debug/registryz", &services); err != nil {
			return err
		}
		for _, s := range services {
			if s.Hostname == echoHost && len(s.ClusterVIPs.Addresses["c-2"]) > 0 {
				return nil
			}
		}
		return fmt.Errorf("no %s with a c-2 VIP in registryz (%d services)\n%s", echoHost, len(services), istiodLog())
	})
	eventually(t, 30*time.Second, "istiod's endpoint shards hold echo's c-2 pod", func() error {
		resp, err := http.Get("http://" + httpAddr + "/debug/endpointShardz")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var shards map[string]map[string]struct {
			Shards map[string][]struct {
				Address   string   `json:"Address"`
				Addresses []string `json:"Addresses"`
			}
		}
		if err := json.NewDecoder(resp.Body).Decode(&shards); err != nil {
			return err
		}
		for key, eps := range shards[echoHost]["demo"].Shards {
			if !strings.HasSuffix(key, "/c-2") {
				continue
			}
			for _, e := range eps {
				if e.Address == remoteIP || slices.Contains(e.Addresses, remoteIP) {
					return nil
				}
			}
		}
		return fmt.Errorf("no endpoint %s in a c-2 shard of %s: %+v", remoteIP, echoHost, shards[echoHost])
	})

	// Exactly what istiod uses: every request granted and none refused; only list, watch
	// (and TokenReview creates); and each rule beyond the Isthmus reader's is used.
	_, refusedBefore := readAudit(t, auditLog, isthmusReader)
	t.Logf("the Isthmus reader was refused: %v", refusedBefore)
	allowed, refused := readAudit(t, auditLog, istiodReader)
	if len(refused) > 0 {
		t.Errorf("istiod's reader was refused %v", refused)
	}
	rules, nsRules := remote.IstioReaderRules(), remote.IstioNamespaceRules()
	for r := range allowed {
		if !grants(rules, r) && !(r.ns == "istio-system" && grants(nsRules, r)) {
			t.Errorf("istiod's reader did %s, which --rights istio does not grant", r)
		}
	}
	for _, rule := range append(rules[len(remote.ReaderRules()):], nsRules...) {
		for _, res := range rule.Resources {
			used := false
			for r := range allowed {
				used = used || (r.group == rule.APIGroups[0] && r.resource == res)
			}
			if !used {
				t.Errorf("--rights istio grants %s/%s, which istiod never requested (requests: %v)", rule.APIGroups[0], res, allowed)
			}
		}
	}
	t.Logf("istiod's reader requests in c-2: %v", allowed)
}
