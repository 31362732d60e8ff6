package eastwest

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Reproduce with:
//
//	go test ./eastwest -run '^$' -bench . -count 5
//
// Each benchmark runs the same client against a backend directly and through the gateway
// in the same process, so the ratio of the two is the gateway's cost. The client first
// sends a real ClientHello (the gateway needs one to route), then bulk data; the backend
// discards the hello and answers as configured.

// sink accepts connections, skips the hello, and either drains (bulk) or echoes one byte
// per byte received (ping).
func sink(b *testing.B, helloLen int, echo bool) netip.AddrPort {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.ReadFull(c, make([]byte, helloLen))
				if !echo {
					io.Copy(io.Discard, c)
					return
				}
				buf := make([]byte, 1)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
					c.Write(buf)
				}
			}()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

func benchTargets(b *testing.B, backend netip.AddrPort) map[string]string {
	targets, _ := benchGateway(b, backend)
	return targets
}

func benchGateway(b *testing.B, backend netip.AddrPort) (map[string]string, *Gateway) {
	routes := &Table{}
	routes.Update(map[string][]netip.AddrPort{"outbound|8080||echo.demo.svc.cluster.local": {backend}})
	gw, err := New(Config{Routes: routes, Metrics: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go gw.Serve(l)
	b.Cleanup(func() { l.Close() })
	return map[string]string{"direct": backend.String(), "gateway": l.Addr().String()}, gw
}

func BenchmarkThroughput(b *testing.B) {
	hello := clientHello(b, testSNI)
	targets := benchTargets(b, sink(b, len(hello), false))
	chunk := make([]byte, 256*1024)
	for _, name := range []string{"direct", "gateway"} {
		b.Run(name, func(b *testing.B) {
			c, err := net.Dial("tcp", targets[name])
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			c.Write(hello)
			b.SetBytes(int64(len(chunk)))
			cpu0 := cpuTime()
			n := 0
			for b.Loop() {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
				n++
			}
			// CPU of the whole process (client, gateway, backend) per gigabit moved; the
			// gateway's own cost is the gateway run's figure minus the direct run's.
			gbits := float64(n*len(chunk)*8) / 1e9
			b.ReportMetric(float64((cpuTime()-cpu0).Milliseconds())/gbits, "cpu-ms/Gbit")
		})
	}
}

func BenchmarkRequestLatency(b *testing.B) {
	hello := clientHello(b, testSNI)
	targets := benchTargets(b, sink(b, len(hello), true))
	for _, name := range []string{"direct", "gateway"} {
		b.Run(name, func(b *testing.B) {
			c, err := net.Dial("tcp", targets[name])
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			c.Write(hello)
			buf := []byte{1}
			var lat []time.Duration
			for b.Loop() {
				start := time.Now()
				c.Write(buf)
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(start))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "us-p50")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "us-p99")
		})
	}
}

func BenchmarkNewConnection(b *testing.B) {
	hello := clientHello(b, testSNI)
	targets := benchTargets(b, sink(b, len(hello), true))
	for _, name := range []string{"direct", "gateway"} {
		b.Run(name, func(b *testing.B) {
			buf := []byte{1}
			for b.Loop() {
				c, err := net.Dial("tcp", targets[name])
				if err != nil {
					b.Fatal(err)
				}
				c.Write(append(hello[:len(hello):len(hello)], 1))
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}

// BenchmarkMemoryPerConnection holds 2,000 idle proxied connections open and reports the
// gateway process's heap and goroutine stacks per connection (client and backend sockets
// are in the same process, so their buffers count too: an upper bound).
func BenchmarkMemoryPerConnection(b *testing.B) {
	hello := clientHello(b, testSNI)
	targets, gw := benchGateway(b, sink(b, len(hello), false))
	const n = 2000
	for b.Loop() {
		b.StopTimer()
		before := heapAndStacks()
		conns := make([]net.Conn, 0, n)
		for range n {
			c, err := net.Dial("tcp", targets["gateway"])
			if err != nil {
				b.Fatal(err)
			}
			c.Write(hello)
			conns = append(conns, c)
		}
		deadline := time.Now().Add(30 * time.Second)
		for testutil.ToFloat64(gw.total.WithLabelValues(ResultProxied)) < float64(n) { // every connection in the data path
			if time.Now().After(deadline) {
				b.Fatal("connections did not reach the data path")
			}
			runtime.Gosched()
		}
		after := heapAndStacks()
		b.ReportMetric(float64(after-before)/n, "B/conn")
		for _, c := range conns {
			c.Close()
		}
		b.StartTimer()
	}
}

func heapAndStacks() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc + m.StackInuse
}

// cpuTime returns the process's user plus system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
