package scalebench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// childEnv carries the child's Shape (JSON) to the re-executed binary.
const childEnv = "ISTHMUS_SCALEBENCH_CHILD"

// Shape is what the primary's registry holds: Clusters clusters, each defining the same
// Services services (namespace sameness: one hostname per service across clusters) with
// Endpoints endpoints each.
type Shape struct {
	Clusters  int
	Services  int
	Endpoints int
	// Debounce is the primary's debounce window (Config.Debounce).
	Debounce time.Duration
}

// childStats is what the child's /stats reports.
type childStats struct {
	HeapEmpty  uint64 // live heap of the started primary before any cluster was added
	HeapFilled uint64 // after every cluster's shard was added
	Heap       uint64 // now
	CPU        time.Duration
	BytesSent  int64 // gRPC wire bytes of xDS responses sent since start
	Goroutines int
	FillTime   time.Duration
}

// changeReply is what the child's /change reports: when it handed the change to the
// registry, on the wall clock this process shares with the parent.
type changeReply struct{ At int64 }

// ServeIfChild runs the primary and returns never when this process was started by Run
// as its child; otherwise it returns at once. Call it first in main or TestMain.
func ServeIfChild() {
	spec := os.Getenv(childEnv)
	if spec == "" {
		return
	}
	var sh Shape
	if err := json.Unmarshal([]byte(spec), &sh); err != nil {
		fmt.Fprintln(os.Stderr, "scalebench child:", err)
		os.Exit(2)
	}
	if err := serve(sh); err != nil {
		fmt.Fprintln(os.Stderr, "scalebench child:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// liveHeap returns the heap still reachable after two collections.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// cpuUsed returns this process's user and system CPU since it started.
func cpuUsed() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// byteCounter counts the wire bytes of every message a gRPC server sends.
type byteCounter struct{ n atomic.Int64 }

func (c *byteCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (c *byteCounter) HandleRPC(_ context.Context, s stats.RPCStats) {
	if p, ok := s.(*stats.OutPayload); ok {
		c.n.Add(int64(p.WireLength))
	}
}
func (c *byteCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (c *byteCounter) HandleConn(context.Context, stats.ConnStats) {}

// ClusterID names cluster i of a shape.
func ClusterID(i int) mesh.ClusterID { return mesh.ClusterID(fmt.Sprintf("cluster-%04d", i)) }

// ServiceKey names service j of a shape.
func ServiceKey(j int) mesh.ServiceKey {
	return mesh.ServiceKey{Namespace: "bench", Name: fmt.Sprintf("svc-%03d", j)}
}

// ServicePort is the port every service of a shape serves.
const ServicePort = 8080

// shard returns cluster i's content as a watcher's full publish makes it: per service
// one Service and its endpoints, the ports slice shared by the endpoints of one
// EndpointSlice, the labels map the pod's (shared here per service), identities and
// localities as translate sets them.
func (sh Shape) shard(i int) *primary.ShardData {
	id := ClusterID(i)
	data := &primary.ShardData{Services: map[mesh.Hostname]*primary.Service{}, Endpoints: map[mesh.Hostname][]mesh.Endpoint{}}
	loc := mesh.Locality{Region: "region", Zone: fmt.Sprintf("zone-%d", i%3)}
	for j := range sh.Services {
		key := ServiceKey(j)
		h := key.Hostname("")
		vip := netip.AddrFrom4([4]byte{172, 16 + byte(j>>8), byte(j), 1})
		data.Services[h] = &primary.Service{Hostname: h, Key: key, VIP: vip,
			Ports: []primary.ServicePort{{Name: "grpc", Port: ServicePort, Protocol: mesh.ProtocolGRPC}}}
		ports := []mesh.Port{{Name: "grpc", Number: ServicePort, Protocol: mesh.ProtocolGRPC}}
		labels := map[string]string{"app": key.Name, "security.istio.io/tlsMode": "istio"}
		ident := mesh.Identity{TrustDomain: "cluster.local", Namespace: key.Namespace, ServiceAccount: key.Name}
		eps := make([]mesh.Endpoint, sh.Endpoints)
		for e := range eps {
			n := uint32((i*sh.Services+j)*sh.Endpoints + e + 1)
			eps[e] = mesh.Endpoint{
				Address: netip.AddrFrom4([4]byte{10, byte(n >> 16), byte(n >> 8), byte(n)}),
				Ports:   ports, Cluster: id, Locality: loc, Identity: ident,
				Health: mesh.HealthHealthy, MTLSReady: true, Labels: labels,
			}
		}
		data.Endpoints[h] = eps
	}
	return data
}

// writeProfile writes one profile to path.
func writeProfile(path string, write func(io.Writer, int) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// serve is the child's body: an empty primary, its registry filled cluster by cluster,
// ADS and the control API on loopback, until the parent kills it.
func serve(sh Shape) error {
	if sh.Clusters*sh.Services*sh.Endpoints >= 1<<24 {
		return fmt.Errorf("%d endpoints do not fit 10.0.0.0/8", sh.Clusters*sh.Services*sh.Endpoints)
	}
	ctx := context.Background()
	p, err := primary.New(primary.Config{ClusterID: ClusterID(0), LocalClient: fake.NewClientset(), Debounce: sh.Debounce})
	if err != nil {
		return err
	}
	counter := &byteCounter{}
	gs := grpc.NewServer(grpc.StatsHandler(counter))
	p.RegisterXDS(ctx, gs)
	xl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go gs.Serve(xl)
	go p.Run(ctx)
	for ready := time.Now().Add(2 * time.Minute); !p.Ready(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(ready) {
			return fmt.Errorf("scalebench: the primary was not ready within 2 minutes")
		}
	}
	st := childStats{HeapEmpty: liveHeap()}
	start := time.Now()
	reg := p.Registry()
	for i := range sh.Clusters {
		// The local cluster's watcher owns cluster 0's shard and keeps it empty (its
		// clientset is empty); the shape's clusters are all remote ones, 1..Clusters.
		reg.ReplaceShard(primary.ShardKey{Source: primary.SourceKubernetes, Cluster: ClusterID(i + 1)}, sh.shard(i+1))
	}
	st.FillTime = time.Since(start)
	st.HeapFilled = liveHeap()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) {
		s := st
		// CPU and bytes first: the collections liveHeap forces are not the work measured.
		s.CPU, s.BytesSent, s.Goroutines = cpuUsed(), counter.n.Load(), runtime.NumGoroutine()
		if r.FormValue("heap") != "0" {
			s.Heap = liveHeap()
		}
		_ = json.NewEncoder(w).Encode(s)
	})
	mux.HandleFunc("POST /change", func(w http.ResponseWriter, r *http.Request) {
		c, err1 := strconv.Atoi(r.FormValue("cluster"))
		s, err2 := strconv.Atoi(r.FormValue("service"))
		wt, err3 := strconv.Atoi(r.FormValue("weight"))
		if err1 != nil || err2 != nil || err3 != nil || c < 1 || c > sh.Clusters || s < 0 || s >= sh.Services || wt < 1 {
			http.Error(w, "bad change", http.StatusBadRequest)
			return
		}
		// As a watcher's reconcile of one service key: the service and all its
		// endpoints, one of them changed.
		key := primary.ShardKey{Source: primary.SourceKubernetes, Cluster: ClusterID(c)}
		h := ServiceKey(s).Hostname("")
		sd := reg.Shard(key)
		eps := append([]mesh.Endpoint(nil), sd.Endpoints[h]...)
		eps[0].Weight = uint32(wt)
		at := time.Now()
		reg.UpdateService(key, h, sd.Services[h], eps)
		_ = json.NewEncoder(w).Encode(changeReply{At: at.UnixNano()})
	})
	// Profiles for `go tool pprof`, when the parent asks (Case.ProfileDir).
	mux.HandleFunc("POST /profile/heap", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		if err := writeProfile(r.FormValue("path"), pprof.Lookup("heap").WriteTo); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
		}
	})
	var cpuFile *os.File
	mux.HandleFunc("POST /profile/cpu", func(w http.ResponseWriter, r *http.Request) {
		if cpuFile != nil {
			pprof.StopCPUProfile()
			err := cpuFile.Close()
			cpuFile = nil
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
			}
			return
		}
		f, err := os.Create(r.FormValue("path"))
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		cpuFile = f
	})
	cl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Printf("READY %s %s\n", xl.Addr(), cl.Addr())
	return http.Serve(cl, mux)
}
