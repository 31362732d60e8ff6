package eastwest

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/isthmus-mesh/isthmus/trust"
)

const testSNI = "outbound_.8080_._.echo.demo.svc.cluster.local"

// backend is a TLS echo server standing in for a pod: it reports the SNI it saw, echoes
// one line, and answers a half-close with "bye".
func backend(t *testing.T) (netip.AddrPort, *x509.Certificate) {
	t.Helper()
	root, _ := trust.NewRoot("cluster.local", trust.RootOptions{})
	certs, key, _ := root.IssueServing([]string{"echo"}, time.Hour)
	cert := tls.Certificate{PrivateKey: key}
	for _, p := range certs {
		c, _ := tlsCertBytes(p)
		cert.Certificate = append(cert.Certificate, c)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				r := bufio.NewReader(tc)
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				io.WriteString(tc, "sni="+tc.ConnectionState().ServerName+" echo="+line)
				io.Copy(io.Discard, r) // until the client half-closes
				io.WriteString(tc, "bye\n")
			}()
		}
	}()
	leaf, _ := x509.ParseCertificate(cert.Certificate[0])
	return netip.MustParseAddrPort(l.Addr().String()), leaf
}

func tlsCertBytes(p []byte) ([]byte, error) {
	b, _ := pem.Decode(p)
	if b == nil {
		return nil, io.ErrUnexpectedEOF
	}
	return b.Bytes, nil
}

type fixture struct {
	gw      *Gateway
	addr    string
	metrics *prometheus.Registry
	routes  *Table
	done    chan error
}

func startGateway(t *testing.T, mutate func(*Config)) *fixture {
	t.Helper()
	f := &fixture{metrics: prometheus.NewRegistry(), routes: &Table{}, done: make(chan error, 1)}
	cfg := Config{Routes: f.routes, Metrics: f.metrics}
	if mutate != nil {
		mutate(&cfg)
	}
	gw, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.gw, f.addr = gw, l.Addr().String()
	go func() { f.done <- gw.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		gw.Shutdown(ctx)
	})
	return f
}

func (f *fixture) count(result string) float64 {
	return testutil.ToFloat64(f.gw.total.WithLabelValues(result))
}

func dialTLS(t *testing.T, addr, sni string, leaf *x509.Certificate) (*tls.Conn, error) {
	t.Helper()
	return tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		ServerName: sni, InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if leaf != nil && string(raw[0]) != string(leaf.Raw) {
				return io.ErrUnexpectedEOF
			}
			return nil
		},
	})
}

func TestPassthroughEndToEnd(t *testing.T) {
	before := runtime.NumGoroutine()
	ep, leaf := backend(t)
	dead, _ := net.Listen("tcp", "127.0.0.1:0")
	deadAddr := netip.MustParseAddrPort(dead.Addr().String())
	dead.Close() // nothing listens there: dials fail and are retried on the next endpoint
	f := startGateway(t, nil)
	f.routes.Update(map[string][]netip.AddrPort{"outbound|8080||echo.demo.svc.cluster.local": {deadAddr, ep}})

	for i := range 4 {
		c, err := dialTLS(t, f.addr, testSNI, leaf)
		if err != nil {
			t.Fatalf("conn %d: TLS through the gateway: %v", i, err)
		}
		io.WriteString(c, "hello\n")
		r := bufio.NewReader(c)
		line, _ := r.ReadString('\n')
		if line != "sni="+testSNI+" echo=hello\n" {
			t.Fatalf("conn %d: got %q; TLS must end at the backend, SNI intact", i, line)
		}
		c.CloseWrite() // half-close travels through the gateway
		if bye, _ := r.ReadString('\n'); bye != "bye\n" {
			t.Fatalf("conn %d: half-close not propagated: %q", i, bye)
		}
		c.Close()
	}
	if got := f.count(ResultProxied); got != 4 {
		t.Fatalf("proxied %v", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.gw.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	waitGoroutines(t, before)
}

func waitGoroutines(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before+2 { // backend listener goroutines end with Cleanup
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines leaked: %d > %d\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestBadInputIsClosedAndCounted(t *testing.T) {
	ep, _ := backend(t)
	f := startGateway(t, func(c *Config) { c.HelloTimeout = 300 * time.Millisecond; c.MaxHello = 2048 })
	f.routes.Update(map[string][]netip.AddrPort{"outbound|8080||echo.demo.svc.cluster.local": {ep}})
	raw := func(data []byte) {
		c, err := net.Dial("tcp", f.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(data)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || strings.Contains(err.Error(), "timeout") {
			t.Errorf("gateway did not close the connection: %d, %v", n, err)
		}
	}
	hello := clientHello(t, testSNI)
	tests := []struct {
		name   string
		send   func()
		result string
	}{
		{"not TLS", func() { raw([]byte("GET / HTTP/1.1\r\n\r\n")) }, ResultNotTLS},
		{"no SNI", func() { raw(clientHello(t, "")) }, ResultNoSNI},
		{"unknown SNI", func() { raw(clientHello(t, "outbound_.9999_._.nope.demo.svc.cluster.local")) }, ResultUnknownSNI},
		{"not a cross-network SNI", func() { raw(clientHello(t, "www.example.com")) }, ResultBadSNI},
		{"truncated hello", func() { raw(hello[:len(hello)/2]) }, ResultTimeout},
		{"oversized hello", func() { raw([]byte{22, 3, 1, 0x40, 0x00}) }, ResultTooLarge},
		{"malformed hello", func() { raw([]byte{22, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0}) }, ResultMalformed},
		{"silent client", func() { raw(nil) }, ResultTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := f.count(tt.result)
			tt.send()
			deadline := time.Now().Add(3 * time.Second)
			for f.count(tt.result) != before+1 {
				if time.Now().After(deadline) {
					t.Fatalf("%s not counted", tt.result)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

func TestConnectionLimitIdleTimeoutAndDrain(t *testing.T) {
	ep, leaf := backend(t)
	f := startGateway(t, func(c *Config) { c.MaxConnections = 1; c.IdleTimeout = 400 * time.Millisecond })
	f.routes.Update(map[string][]netip.AddrPort{"outbound|8080||echo.demo.svc.cluster.local": {ep}})
	first, err := dialTLS(t, f.addr, testSNI, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dialTLS(t, f.addr, testSNI, leaf); err == nil {
		t.Fatal("a connection over the limit was served")
	}
	if f.count(ResultLimit) != 1 {
		t.Fatalf("limit not counted: %v", f.count(ResultLimit))
	}
	// The idle first connection is closed after about IdleTimeout.
	first.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if _, err := first.Read(make([]byte, 1)); err == nil {
		t.Fatal("idle connection not closed")
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("idle close took %s", d)
	}

	// The client sees the close before the gateway's goroutine has given back its slot
	// (the limit is 1): wait for the gateway to count no active connection.
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(f.gw.conns) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the idle connection's slot was never released")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// Drain: an in-flight connection finishes; new ones are refused.
	c, err := dialTLS(t, f.addr, testSNI, leaf)
	if err != nil {
		t.Fatal(err)
	}
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- f.gw.Shutdown(ctx)
	}()
	refusing := time.Now().Add(5 * time.Second)
	for {
		nc, err := net.DialTimeout("tcp", f.addr, time.Second)
		if err != nil {
			break // the listener is closed: draining
		}
		nc.Close()
		if time.Now().After(refusing) {
			t.Fatal("the gateway kept accepting connections while draining")
		}
		time.Sleep(10 * time.Millisecond)
	}
	io.WriteString(c, "still here\n")
	r := bufio.NewReader(c)
	if line, _ := r.ReadString('\n'); !strings.Contains(line, "still here") {
		t.Fatalf("in-flight connection broken by drain: %q", line)
	}
	c.CloseWrite()
	r.ReadString('\n')
	c.Close()
	if err := <-shut; err != nil {
		t.Fatalf("drain: %v", err)
	}
}
