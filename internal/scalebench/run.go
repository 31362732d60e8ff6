package scalebench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// Case is one measurement: a registry shape, the clients connected to it, and the
// isolated changes applied.
type Case struct {
	Shape
	// Clients is how many ADS streams connect (100 per connection).
	Clients int
	// Subscribe is how many services' endpoints each client subscribes to (client i
	// takes services i, i+1, … modulo Services); 1 is a proxyless gRPC client of one
	// service.
	Subscribe int
	// Delta uses incremental xDS instead of state of the world.
	Delta bool
	// Changes is how many isolated changes are timed.
	Changes int
	// ProfileDir, when set, receives the child's heap profile once the clients are
	// connected (heap.pprof) and its CPU profile over the changes (cpu.pprof).
	ProfileDir string
	// Gap is the quiet time after a change was delivered before the next one, longer
	// than the debounce window so that each change is isolated; default Debounce+20 ms.
	Gap time.Duration
}

// Result is one case's figures.
type Result struct {
	Case
	Endpoints int // in the registry
	// HeapPerCluster and HeapPerEndpoint are the child's live heap once the clients'
	// view was built and pushed, less the empty primary's, divided by clusters and by
	// endpoints (each figure carries the other's share: services, shards, merges,
	// built and marshalled resources).
	HeapPerCluster  float64
	HeapPerEndpoint float64
	// HeapPerClient is the heap the connected streams added, divided by clients.
	HeapPerClient float64
	FillTime      time.Duration
	// P50, P99 and Max are over every (change, subscribed client): from the child
	// handing the change to the registry until the client received it.
	P50, P99, Max time.Duration
	// AllP50 is, per change, until the last subscribed client had it.
	AllP50 time.Duration
	// CPUPerChange is the child's CPU (user+system) over the change phase divided by
	// changes: merge, build, marshal, sends, the control request.
	CPUPerChange time.Duration
	// BytesPerChange is the xDS bytes the child sent per change (gRPC wire length).
	BytesPerChange float64
	// Receivers is how many clients received each change.
	Receivers int
}

// Run starts the child with c's shape, connects the clients, applies the changes and
// returns the figures. self is the command that re-executes this binary (os.Args[0]
// and the arguments that make it reach ServeIfChild, e.g. -test.run for a test binary).
func Run(ctx context.Context, c Case, self []string, progress io.Writer) (Result, error) {
	if c.Subscribe < 1 {
		c.Subscribe = 1
	}
	if c.Gap == 0 {
		c.Gap = c.Debounce + 20*time.Millisecond
	}
	if c.Subscribe > c.Services || c.Clients < 1 || c.Changes < 1 {
		return Result{}, fmt.Errorf("scalebench: bad case %+v", c)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	spec, _ := json.Marshal(c.Shape)
	cmd := exec.CommandContext(ctx, self[0], self[1:]...)
	cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return Result{}, err
	}
	if err := cmd.Start(); err != nil {
		return Result{}, fmt.Errorf("scalebench: start child: %w", err)
	}
	defer func() { cancel(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	f := strings.Fields(line)
	if err != nil || len(f) != 3 || f[0] != "READY" {
		return Result{}, fmt.Errorf("scalebench: child did not start: %q %v", line, err)
	}
	go io.Copy(io.Discard, out)
	ch := &child{ctl: "http://" + f[2]}
	fmt.Fprintf(progress, "scalebench: %d clusters × %d services × %d endpoints filled; connecting %d clients\n",
		c.Clusters, c.Services, c.Endpoints, c.Clients)

	conns := make([]*grpc.ClientConn, (c.Clients+99)/100)
	for i := range conns {
		if conns[i], err = grpc.NewClient(f[1], grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<30))); err != nil {
			return Result{}, err
		}
		defer conns[i].Close()
	}
	// The first client alone, so that the heap with the view built is measured before
	// the other streams add theirs.
	clients := make([]*client, c.Clients)
	connect := func(i int) error {
		cl := &client{id: i, delta: c.Delta, verify: i < c.Services, got: make(chan struct{}, 1)}
		for k := range c.Subscribe {
			cl.names = append(cl.names, clusterName((i+k)%c.Services))
		}
		clients[i] = cl
		return cl.start(ctx, conns[i/100])
	}
	if err := connect(0); err != nil {
		return Result{}, err
	}
	if err := clients[0].waitFirst(ctx, 5*time.Minute); err != nil {
		return Result{}, err
	}
	built, err := ch.stats()
	if err != nil {
		return Result{}, err
	}
	var wg sync.WaitGroup
	errs := make(chan error, c.Clients)
	for i := 1; i < c.Clients; i++ {
		if err := connect(i); err != nil {
			return Result{}, err
		}
		wg.Go(func() { errs <- clients[i].waitFirst(ctx, 10*time.Minute) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return Result{}, err
		}
	}
	connected, err := ch.stats()
	if err != nil {
		return Result{}, err
	}
	res := Result{Case: c, Endpoints: c.Clusters * c.Services * c.Endpoints, FillTime: built.FillTime}
	grown := float64(built.Heap) - float64(built.HeapEmpty)
	res.HeapPerCluster = grown / float64(c.Clusters)
	res.HeapPerEndpoint = grown / float64(res.Endpoints)
	res.HeapPerClient = (float64(connected.Heap) - float64(built.Heap)) / float64(max(1, c.Clients-1))
	fmt.Fprintf(progress, "scalebench: %d clients connected; %d isolated changes\n", c.Clients, c.Changes)

	if c.ProfileDir != "" {
		if err := ch.post("/profile/heap", filepath.Join(c.ProfileDir, "heap.pprof")); err != nil {
			return Result{}, err
		}
		if err := ch.post("/profile/cpu", filepath.Join(c.ProfileDir, "cpu.pprof")); err != nil {
			return Result{}, err
		}
	}
	var lat, all []time.Duration
	before, err := ch.stats(false)
	if err != nil {
		return Result{}, err
	}
	receivers := 0
	for n := range c.Changes {
		svc := n % c.Services
		weight := n + 2
		var subs []*client
		for _, cl := range clients {
			if slices.Contains(cl.names, clusterName(svc)) {
				cl.expect(clusterName(svc), uint32(weight))
				subs = append(subs, cl)
			}
		}
		receivers = len(subs)
		at, err := ch.change(1+n%c.Clusters, svc, weight)
		if err != nil {
			return Result{}, err
		}
		var last time.Time
		for _, cl := range subs {
			t, err := cl.wait(ctx, time.Minute)
			if err != nil {
				return Result{}, fmt.Errorf("scalebench: change %d: client %d: %w", n, cl.id, err)
			}
			lat = append(lat, t.Sub(at))
			if t.After(last) {
				last = t
			}
		}
		all = append(all, last.Sub(at))
		time.Sleep(c.Gap)
	}
	if c.ProfileDir != "" {
		if err := ch.post("/profile/cpu", ""); err != nil {
			return Result{}, err
		}
	}
	after, err := ch.stats(false)
	if err != nil {
		return Result{}, err
	}
	slices.Sort(lat)
	slices.Sort(all)
	res.P50, res.P99, res.Max = quantile(lat, 0.5), quantile(lat, 0.99), lat[len(lat)-1]
	res.AllP50 = quantile(all, 0.5)
	res.CPUPerChange = (after.CPU - before.CPU) / time.Duration(c.Changes)
	res.BytesPerChange = float64(after.BytesSent-before.BytesSent) / float64(c.Changes)
	res.Receivers = receivers
	return res, nil
}

// quantile returns the q-quantile of sorted d (nearest rank).
func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(q*float64(len(d))+0.5) - 1
	return d[min(max(i, 0), len(d)-1)]
}

// clusterName is the EDS resource name of service j's port.
func clusterName(j int) string {
	return mesh.OutboundName{Port: ServicePort, Host: ServiceKey(j).Hostname("")}.ClusterName()
}

// child is the control API of the child process.
type child struct{ ctl string }

// stats reads the child's figures; heap forces two collections first to report the
// live heap, which costs CPU that is then not part of what is measured next.
func (c *child) stats(heap ...bool) (childStats, error) {
	var s childStats
	q := ""
	if len(heap) > 0 && !heap[0] {
		q = "?heap=0"
	}
	resp, err := http.Get(c.ctl + "/stats" + q)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

func (c *child) post(path, file string) error {
	resp, err := http.PostForm(c.ctl+path, url.Values{"path": {file}})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("scalebench: %s: %s: %s", path, resp.Status, b)
	}
	return nil
}

func (c *child) change(cluster, service, weight int) (time.Time, error) {
	resp, err := http.PostForm(c.ctl+"/change", url.Values{
		"cluster": {fmt.Sprint(cluster)}, "service": {fmt.Sprint(service)}, "weight": {fmt.Sprint(weight)}})
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return time.Time{}, fmt.Errorf("scalebench: change: %s: %s", resp.Status, b)
	}
	var r changeReply
	err = json.NewDecoder(resp.Body).Decode(&r)
	return time.Unix(0, r.At), err
}

// client is one raw ADS stream of a proxyless gRPC node subscribed to names' endpoints.
// It records when a response carrying the expected resource arrives; a verifying client
// decodes it and checks the expected weight is there, the others see that the
// resource's version changed (delta) or that a response carried it (state of the
// world: every response follows a change).
type client struct {
	id     int
	names  []string
	delta  bool
	verify bool

	mu       sync.Mutex
	want     string // resource name expected next
	weight   uint32
	at       time.Time
	first    bool
	failure  error
	versions map[string]string // delta: last version per resource
	got      chan struct{}
}

func (cl *client) node() *core.Node {
	meta, _ := structpb.NewStruct(map[string]any{primary.MetaGenerator: "grpc", primary.MetaClusterID: string(ClusterID(0))})
	return &core.Node{Id: fmt.Sprintf("sidecar~10.255.%d.%d~client-%d.bench~bench.svc.cluster.local", cl.id/250, cl.id%250+1, cl.id), Metadata: meta}
}

func (cl *client) start(ctx context.Context, conn *grpc.ClientConn) error {
	ads := discovery.NewAggregatedDiscoveryServiceClient(conn)
	cl.versions = map[string]string{}
	if cl.delta {
		s, err := ads.DeltaAggregatedResources(ctx)
		if err != nil {
			return err
		}
		node := cl.node() // on every request: the delta server does not carry it over
		if err := s.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResourceNamesSubscribe: cl.names}); err != nil {
			return err
		}
		go func() {
			for {
				r, err := s.Recv()
				if err != nil {
					cl.fail(err)
					return
				}
				for _, res := range r.Resources {
					cl.onResource(res.Name, res.Version, res.Resource.GetValue())
				}
				if err := s.Send(&discovery.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResponseNonce: r.Nonce}); err != nil {
					cl.fail(err)
					return
				}
				cl.onResponse()
			}
		}()
		return nil
	}
	s, err := ads.StreamAggregatedResources(ctx)
	if err != nil {
		return err
	}
	if err := s.Send(&discovery.DiscoveryRequest{Node: cl.node(), TypeUrl: resource.EndpointType, ResourceNames: cl.names}); err != nil {
		return err
	}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				cl.fail(err)
				return
			}
			// State of the world resends every subscribed resource, without versions of
			// their own: each is named by its cluster_name.
			for _, res := range r.Resources {
				cl.onResource(claName(res.GetValue()), "", res.GetValue())
			}
			if err := s.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: cl.names,
				VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
				cl.fail(err)
				return
			}
			cl.onResponse()
		}
	}()
	return nil
}

// claName returns a marshalled ClusterLoadAssignment's cluster_name (field 1) without
// decoding its endpoints.
func claName(b []byte) string {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return ""
			}
			return string(v)
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return ""
		}
		b = b[n:]
	}
	return ""
}

func (cl *client) signal() {
	select {
	case cl.got <- struct{}{}:
	default:
	}
}

func (cl *client) fail(err error) {
	cl.mu.Lock()
	if cl.failure == nil {
		cl.failure = err
	}
	cl.mu.Unlock()
	cl.signal()
}

// expect arms the client for the next change: name with weight.
func (cl *client) expect(name string, weight uint32) {
	cl.mu.Lock()
	cl.want, cl.weight, cl.at = name, weight, time.Time{}
	cl.mu.Unlock()
	select { // drop a stale signal
	case <-cl.got:
	default:
	}
}

// onResponse records that a whole response was handled (and ACKed).
func (cl *client) onResponse() {
	cl.mu.Lock()
	first := !cl.first
	cl.first = true
	cl.mu.Unlock()
	if first {
		cl.signal()
	}
}

// onResource records one received resource. Before the first response completed, and
// for resources other than the expected one, it only notes the version. The expected
// one counts when its version changed (delta) or, for a verifying client, once it
// decodes with the expected weight (a client that does not verify takes the first copy
// after the change was armed: changes are isolated, so nothing else is pushed).
func (cl *client) onResource(name, version string, value []byte) {
	now := time.Now()
	cl.mu.Lock()
	defer cl.mu.Unlock()
	prev := cl.versions[name]
	cl.versions[name] = version
	if !cl.first || name == "" || name != cl.want || !cl.at.IsZero() {
		return
	}
	if cl.delta && prev == version {
		return
	}
	if cl.verify {
		var cla endpoint.ClusterLoadAssignment
		if err := proto.Unmarshal(value, &cla); err != nil {
			cl.failure = fmt.Errorf("decode %s: %w", name, err)
		} else if !hasWeight(&cla, cl.weight) {
			return // an earlier state; the change is still to come
		}
	}
	cl.at = now
	cl.signal()
}

func hasWeight(cla *endpoint.ClusterLoadAssignment, w uint32) bool {
	for _, loc := range cla.Endpoints {
		for _, le := range loc.LbEndpoints {
			if le.GetLoadBalancingWeight().GetValue() == w {
				return true
			}
		}
	}
	return false
}

// waitFirst waits for the stream's first response.
func (cl *client) waitFirst(ctx context.Context, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		cl.mu.Lock()
		first, failure := cl.first, cl.failure
		cl.mu.Unlock()
		if failure != nil {
			return failure
		}
		if first {
			return nil
		}
		select {
		case <-cl.got:
		case <-t.C:
			return fmt.Errorf("scalebench: client %d: no first response after %v", cl.id, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// wait waits for the expected change and returns when it arrived.
func (cl *client) wait(ctx context.Context, timeout time.Duration) (time.Time, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		cl.mu.Lock()
		at, failure := cl.at, cl.failure
		cl.mu.Unlock()
		if failure != nil {
			return time.Time{}, failure
		}
		if !at.IsZero() {
			return at, nil
		}
		select {
		case <-cl.got:
		case <-t.C:
			return time.Time{}, errors.New("not received in time")
		case <-ctx.Done():
			return time.Time{}, ctx.Err()
		}
	}
}
