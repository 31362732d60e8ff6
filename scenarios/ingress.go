package scenarios

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/internal/istiocrd"
)

// IngressSpec makes an ingress scenario (docs/proxy.md): an ingress gateway on one
// cluster's network, configured by Istio's Gateway, VirtualService and DestinationRule,
// and checks made with curl from outside every mesh network.
type IngressSpec struct {
	// Cluster runs the ingress, on its network, configured by its primary.
	Cluster string `json:"cluster"`
	// CredentialName is the kubernetes.io/tls Secret in SystemNamespace that the runner
	// creates with a certificate for Hosts from a CA of its own (the Gateway's TLS
	// servers name it); curl trusts that CA.
	CredentialName string   `json:"credentialName"`
	Hosts          []string `json:"hosts"`
	// Config is Istio YAML (Gateway, VirtualService, DestinationRule), applied to every
	// primary's cluster: the ingress's primary routes by it, and a network's gateway needs
	// its own primary's subsets.
	Config string `json:"config"`
	// Checks run in order with curl.
	Checks []IngressCheck `json:"checks"`
}

// IngressCheck is one request, sent Calls times from outside the mesh.
type IngressCheck struct {
	// Name says what the check proves.
	Name string `json:"name"`
	// URL is requested; its host resolves to the ingress (curl --resolve), and its port
	// defaults to the scheme's.
	URL string `json:"url"`
	// Host, when set, is the Host header (the TLS server name stays the URL's).
	Host string `json:"host,omitempty"`
	// NoSNI connects to the ingress by address, so the ClientHello carries no server name.
	NoSNI bool `json:"noSNI,omitempty"`
	// ClientCert presents a client certificate from the runner's CA (the credential's
	// ca.crt), for servers in MUTUAL mode.
	ClientCert bool `json:"clientCert,omitempty"`
	// HTTP2 speaks HTTP/2 (curl --http2; ALPN h2 over TLS, prior knowledge in plaintext).
	HTTP2 bool `json:"http2,omitempty"`
	// Calls is how many requests make the check; default 10.
	Calls int `json:"calls,omitempty"`
	// Status is the HTTP status every request must get; 0 with Refused.
	Status int `json:"status,omitempty"`
	// Clusters, for answered requests, are the clusters that must answer (each at least
	// once; no other); Location, for redirects, the Location header.
	Clusters []string `json:"clusters,omitempty"`
	Location string   `json:"location,omitempty"`
	// Pods, when set, is how many distinct pods must answer (round robin over them).
	Pods int `json:"pods,omitempty"`
	// Refused says the ingress must close the connection (no HTTP answer).
	Refused bool `json:"refused,omitempty"`
	// CallerIdentity, when set, is the SPIFFE ID every answering backend must have seen
	// (the ingress's own mesh identity: mTLS from the ingress to the pod).
	CallerIdentity string `json:"callerIdentity,omitempty"`
}

// validateIngress checks the ingress section.
func (t *Topology) validateIngress(add func(string, ...any), clusters map[string]ClusterSpec) {
	in := t.Ingress
	if in == nil {
		return
	}
	c, ok := clusters[in.Cluster]
	if !ok {
		add("ingress.cluster: unknown cluster %q", in.Cluster)
	} else if c.ControlPlane.Role != RolePrimary {
		add("ingress.cluster: %s has no primary to configure the ingress", in.Cluster)
	}
	if err := checkName(in.CredentialName); err != nil {
		add("ingress.credentialName: %v", err)
	}
	if len(in.Hosts) == 0 {
		add("ingress.hosts: name at least one host for the certificate")
	}
	if _, err := ingressObjects(in.Config); err != nil {
		add("ingress.config: %v", err)
	}
	if len(in.Checks) == 0 {
		add("ingress.checks: name at least one check")
	}
	for i, ch := range in.Checks {
		if ch.Name == "" {
			add("ingress.checks[%d].name: required", i)
		}
		scheme, rest, ok := strings.Cut(ch.URL, "://")
		if !ok || (scheme != "http" && scheme != "https") || rest == "" {
			add("ingress.checks[%d].url: %q is not an http:// or https:// URL", i, ch.URL)
		}
		if ch.Refused == (ch.Status != 0) {
			add("ingress.checks[%d]: want exactly one of status and refused", i)
		}
		if ch.Pods < 0 || (ch.Pods > 0 && ch.Status != 200) {
			add("ingress.checks[%d].pods: only for status 200, and not negative", i)
		}
		if ch.Calls < 0 || ch.Calls > 200 {
			add("ingress.checks[%d].calls: %d is not between 1 and 200", i, ch.Calls)
		}
		for _, cl := range ch.Clusters {
			if _, ok := clusters[cl]; !ok {
				add("ingress.checks[%d].clusters: unknown cluster %q", i, cl)
			}
		}
	}
}

// ingressObjects decodes the ingress configuration.
func ingressObjects(config string) ([]any, error) {
	var gateways []string
	var rest []string
	for doc := range strings.SplitSeq(config, "\n---") {
		var meta metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			return nil, err
		}
		if meta.Kind == "Gateway" {
			gateways = append(gateways, doc)
		} else if strings.TrimSpace(doc) != "" {
			rest = append(rest, doc)
		}
	}
	if len(gateways) == 0 {
		return nil, errors.New("no Gateway document")
	}
	objs, err := trafficObjects(strings.Join(rest, "\n---"))
	if err != nil {
		return nil, err
	}
	for i, doc := range gateways {
		gw := &networkingv1.Gateway{}
		if err := yaml.UnmarshalStrict([]byte(doc), gw); err != nil {
			return nil, fmt.Errorf("Gateway %d: %w", i, err)
		}
		objs = append(objs, gw)
	}
	// Applied in dependency order, so a primary never sees a VirtualService before the
	// DestinationRule its subsets name (it would refuse it until then): DestinationRules,
	// ServiceEntries, Gateways, then VirtualServices.
	rank := func(o any) int {
		switch o.(type) {
		case *networkingv1.DestinationRule:
			return 0
		case *networkingv1.ServiceEntry:
			return 1
		case *networkingv1.Gateway:
			return 2
		}
		return 3
	}
	slices.SortStableFunc(objs, func(a, b any) int { return rank(a) - rank(b) })
	return objs, nil
}

// IngressReport is what the ingress checks saw.
type IngressReport struct {
	Passed bool `json:"passed"`
	// Ingress is the address clients outside the mesh reach.
	Ingress string          `json:"ingress"`
	Checks  []IngressResult `json:"checks"`
}

// IngressResult is one check's measurement and verdict.
type IngressResult struct {
	Name   string `json:"name"`
	Passed bool   `json:"passed"`
	// Measured says what the requests got, e.g. "200 ×10 from cluster-1 (2 pods)".
	Measured string `json:"measured"`
	// Attempts counts measurements (a check is repeated while the mesh converges).
	Attempts int      `json:"attempts"`
	Reasons  []string `json:"reasons,omitempty"`
	// Callers are the identities the backends saw (the ingress's own).
	Callers []string `json:"callers,omitempty"`
}

// IngressOptions tunes RunIngress.
type IngressOptions struct {
	// Timeout bounds each check's repetitions while the mesh converges; default 60 s.
	Timeout time.Duration
	// Progress receives a line per step; nil discards.
	Progress func(string)
}

// RunIngress creates the ingress's certificate Secret, installs Istio's CRDs and the
// ingress configuration on every primary's cluster, waits until each primary applied it,
// starts the ingress and runs the checks with curl from outside every mesh network. Run
// again, it runs the topology's checks (as they are then) against the same ingress.
func (r *Run) RunIngress(ctx context.Context, o IngressOptions) (*IngressReport, error) {
	in := r.Topology.Ingress
	if in == nil {
		return nil, fmt.Errorf("scenarios: %s has no ingress section", r.Topology.Name)
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	progress := o.Progress
	if progress == nil {
		progress = func(string) {}
	}
	if _, err := exec.LookPath("curl"); err != nil {
		return nil, errors.New("scenarios: the ingress checks need curl (apt-get install curl)")
	}
	if r.Ingress != nil { // checks run again against the running ingress, as configured
		return r.ingressChecks(ctx, in, r.ingressCA, o.Timeout, progress)
	}
	objs, err := ingressObjects(in.Config)
	if err != nil {
		return nil, fmt.Errorf("scenarios: ingress config: %w", err)
	}
	dir := filepath.Join(r.Dir, "ingress")
	caFile, secret, err := ingressCertificate(dir, in.CredentialName, in.Hosts)
	if err != nil {
		return nil, err
	}
	i := slices.IndexFunc(r.Env.Clusters(), func(c *Cluster) bool { return c.Name == in.Cluster })
	if i < 0 {
		return nil, fmt.Errorf("scenarios: ingress: no cluster %q", in.Cluster)
	}
	home := r.Env.Clusters()[i]
	for _, o := range []any{&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: IngressServiceAccount, Namespace: SystemNamespace}}, secret} {
		if err := apply(ctx, home.Client, o); err != nil {
			return nil, fmt.Errorf("scenarios: ingress in %s: %w", in.Cluster, err)
		}
	}
	for _, c := range r.Env.Clusters() {
		pc := r.Primaries[c.Name]
		if pc == nil {
			continue
		}
		progress(fmt.Sprintf("applying Istio's CRDs and %d ingress object(s) to %s", len(objs), c.Name))
		if err := istiocrd.Apply(ctx, c.REST); err != nil {
			return nil, err
		}
		ic, err := istioclient.NewForConfig(c.REST)
		if err != nil {
			return nil, fmt.Errorf("scenarios: istio client for %s: %w", c.Name, err)
		}
		fresh, _ := ingressObjects(in.Config)
		for _, obj := range fresh {
			if err := applyIstio(ctx, ic, obj); err != nil {
				return nil, fmt.Errorf("scenarios: %s: %w", c.Name, err)
			}
		}
		if err := waitApplied(ctx, pc.Addresses["http"], len(objs), o.Timeout); err != nil {
			return nil, fmt.Errorf("scenarios: primary of %s: %w", c.Name, err)
		}
	}
	pc := r.Primaries[in.Cluster]
	progress(fmt.Sprintf("starting the ingress gateway in %s (isthmus proxy --mode ingress)", in.Cluster))
	comp, err := r.Env.StartIngress(ctx, IngressProxySpec{Cluster: in.Cluster, XDS: pc.Addresses["xds"],
		RootCert: r.anchorsFileOf(in.Cluster), Name: "istio-ingressgateway-" + in.Cluster})
	if err != nil {
		return nil, err
	}
	r.Ingress, r.ingressCA = comp, caFile
	return r.ingressChecks(ctx, in, caFile, o.Timeout, progress)
}

// ingressChecks runs the checks against the running ingress.
func (r *Run) ingressChecks(ctx context.Context, in *IngressSpec, caFile string, timeout time.Duration, progress func(string)) (*IngressReport, error) {
	ext := r.Env.ExternalCommand()
	if len(ext) == 0 {
		return nil, errors.New("scenarios: ingress: the provider has no place outside the mesh networks to run curl from")
	}
	rep := &IngressReport{Passed: true, Ingress: r.Ingress.Public.Addr().String()}
	for _, ch := range in.Checks {
		progress("ingress check: " + ch.Name)
		res := r.ingressCheck(ctx, ext, r.Ingress.Public.Addr(), caFile, ch, timeout)
		rep.Checks = append(rep.Checks, res)
		rep.Passed = rep.Passed && res.Passed
	}
	return rep, nil
}

// ingressCertificate writes a CA of the run's own and returns its file and a
// kubernetes.io/tls Secret with a certificate for hosts signed by it, and the CA as its
// ca.crt (the client CA of MUTUAL servers). A client certificate from the same CA goes
// to client.pem and client-key.pem beside the CA file.
func ingressCertificate(dir, name string, hosts []string) (string, *corev1.Secret, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "isthmus scenario ingress CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(7 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return "", nil, err
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: hosts[0]}, DNSNames: hosts,
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(7 * 24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return "", nil, err
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", nil, err
	}
	caFile := filepath.Join(dir, "ca.pem")
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		return "", nil, err
	}
	ckey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", nil, err
	}
	ctmpl := &x509.Certificate{SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "scenario external client"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(7 * 24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	cder, err := x509.CreateCertificate(rand.Reader, ctmpl, ca, &ckey.PublicKey, caKey)
	if err != nil {
		return "", nil, err
	}
	ckd, err := x509.MarshalPKCS8PrivateKey(ckey)
	if err != nil {
		return "", nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "client.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cder}), 0o600); err != nil {
		return "", nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "client-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ckd}), 0o600); err != nil {
		return "", nil, err
	}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: SystemNamespace}, Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{
			corev1.TLSCertKey:       pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			corev1.TLSPrivateKeyKey: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}),
			"ca.crt":                caPEM,
		}}
	return caFile, s, nil
}

// curlResult is one request's outcome.
type curlResult struct {
	code     int
	location string
	answer   HTTPAnswer
	err      string // curl's error when no HTTP answer came
}

// curl sends one request from outside the mesh.
func curl(ctx context.Context, ext []string, ingress netip.Addr, caFile string, ch IngressCheck) curlResult {
	scheme, rest, _ := strings.Cut(ch.URL, "://")
	hostport, path, _ := strings.Cut(rest, "/")
	host, port := hostport, "80"
	if scheme == "https" {
		port = "443"
	}
	if h, p, ok := strings.Cut(hostport, ":"); ok {
		host, port = h, p
	}
	args := []string{"curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code} %{redirect_url}", "--cacert", caFile}
	url := ch.URL
	if ch.NoSNI {
		// By address: curl sends no server name for an IP literal.
		url = scheme + "://" + netip.AddrPortFrom(ingress, mustPort(port)).String() + "/" + path
		args = append(args, "-k")
	} else {
		args = append(args, "--resolve", host+":"+port+":"+ingress.String())
	}
	if ch.Host != "" {
		args = append(args, "-H", "Host: "+ch.Host)
	}
	if ch.ClientCert {
		dir := filepath.Dir(caFile)
		args = append(args, "--cert", filepath.Join(dir, "client.pem"), "--key", filepath.Join(dir, "client-key.pem"))
	}
	if ch.HTTP2 {
		if scheme == "https" {
			args = append(args, "--http2")
		} else {
			args = append(args, "--http2-prior-knowledge")
		}
	}
	args = append(args, url)
	cmd := exec.CommandContext(ctx, ext[0], append(slices.Clone(ext[1:]), args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	body, tail, _ := bytesCutLast(out, '\n')
	codeStr, loc, _ := strings.Cut(strings.TrimSpace(string(tail)), " ")
	code, _ := strconv.Atoi(codeStr)
	res := curlResult{code: code, location: strings.TrimSpace(loc)}
	if err != nil || code == 0 {
		res.err = strings.TrimSpace(stderr.String())
		if res.err == "" && err != nil {
			res.err = err.Error()
		}
		res.code = 0
		return res
	}
	if code == 200 {
		if jerr := json.Unmarshal(body, &res.answer); jerr != nil {
			res.err = "answer is not a workload's JSON: " + strings.TrimSpace(string(body))
		}
	}
	return res
}

func mustPort(s string) uint16 {
	p, _ := strconv.Atoi(s)
	return uint16(p)
}

func bytesCutLast(b []byte, sep byte) ([]byte, []byte, bool) {
	i := bytes.LastIndexByte(b, sep)
	if i < 0 {
		return nil, b, false
	}
	return b[:i], b[i+1:], true
}

// ingressCheck measures one check, again while it fails, until timeout.
func (r *Run) ingressCheck(ctx context.Context, ext []string, ingress netip.Addr, caFile string, ch IngressCheck, timeout time.Duration) IngressResult {
	calls := ch.Calls
	if calls == 0 {
		calls = 10
	}
	deadline := time.Now().Add(timeout)
	res := IngressResult{Name: ch.Name}
	for {
		res.Attempts++
		var results []curlResult
		for range calls {
			results = append(results, curl(ctx, ext, ingress, caFile, ch))
		}
		res.Measured, res.Reasons, res.Callers = judgeIngress(ch, results)
		res.Passed = len(res.Reasons) == 0
		if res.Passed || time.Now().After(deadline) || ctx.Err() != nil {
			return res
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// judgeIngress compares what the requests got with what the check wants.
func judgeIngress(ch IngressCheck, results []curlResult) (measured string, reasons []string, callers []string) {
	codes := map[int]int{}
	byCluster := map[string]map[string]bool{}
	var errs []string
	for _, c := range results {
		codes[c.code]++
		if c.err != "" && !slices.Contains(errs, c.err) {
			errs = append(errs, c.err)
		}
		if c.code == 200 && c.answer.Cluster != "" {
			if byCluster[c.answer.Cluster] == nil {
				byCluster[c.answer.Cluster] = map[string]bool{}
			}
			byCluster[c.answer.Cluster][c.answer.Pod] = true
			if !slices.Contains(callers, c.answer.CallerIdentity) {
				callers = append(callers, c.answer.CallerIdentity)
			}
			if ch.CallerIdentity != "" && c.answer.CallerIdentity != ch.CallerIdentity {
				reasons = appendOnce(reasons, fmt.Sprintf("%s saw caller %q, want %q", c.answer.Pod, c.answer.CallerIdentity, ch.CallerIdentity))
			}
		}
		if ch.Location != "" && c.code != 0 && c.location != ch.Location {
			reasons = appendOnce(reasons, fmt.Sprintf("Location %q, want %q", c.location, ch.Location))
		}
	}
	var parts []string
	for _, code := range slices.Sorted(maps.Keys(codes)) {
		name := strconv.Itoa(code)
		if code == 0 {
			name = "no answer"
		}
		parts = append(parts, fmt.Sprintf("%s ×%d", name, codes[code]))
	}
	for _, cl := range slices.Sorted(maps.Keys(byCluster)) {
		parts = append(parts, fmt.Sprintf("%s (%d pod(s))", cl, len(byCluster[cl])))
	}
	measured = strings.Join(parts, ", ")
	want := ch.Status
	if ch.Refused {
		want = 0
	}
	if codes[want] != len(results) {
		r := fmt.Sprintf("want %d of %d requests to get %s", len(results), len(results), statusName(want))
		if len(errs) > 0 {
			r += "; errors: " + strings.Join(errs, "; ")
		}
		reasons = append(reasons, r)
	}
	pods := 0
	for _, ps := range byCluster {
		pods += len(ps)
	}
	if ch.Pods > 0 && pods != ch.Pods {
		reasons = append(reasons, fmt.Sprintf("%d pod(s) answered, want %d", pods, ch.Pods))
	}
	if len(ch.Clusters) > 0 {
		for _, cl := range ch.Clusters {
			if byCluster[cl] == nil {
				reasons = append(reasons, cl+" did not answer")
			}
		}
		for cl := range byCluster {
			if !slices.Contains(ch.Clusters, cl) {
				reasons = append(reasons, cl+" answered and must not")
			}
		}
	}
	return measured, reasons, callers
}

func statusName(code int) string {
	if code == 0 {
		return "a closed connection"
	}
	return "HTTP " + strconv.Itoa(code)
}

func appendOnce(s []string, v string) []string {
	if slices.Contains(s, v) {
		return s
	}
	return append(s, v)
}

// WriteTable prints one line per check.
func (rep *IngressReport) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "INGRESS CHECK\tRESULT\tMEASURED\n")
	for _, c := range rep.Checks {
		verdict := "ok"
		if !c.Passed {
			verdict = "FAIL: " + strings.Join(c.Reasons, "; ")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Name, verdict, c.Measured)
	}
	return tw.Flush()
}
