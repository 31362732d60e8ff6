package proxy_test

import (
	"bytes"
	"crypto/tls"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/isthmus-mesh/isthmus/proxy"
)

// TestSlowlorisAndStreamFlood: clients that send headers a line a second, and one that
// opens and resets a thousand HTTP/2 streams at once (the rapid-reset pattern), are cut
// off — the slow ones when the 10 s header timeout passes, each counted as bad_http —
// while an ordinary client keeps being served, and every goroutine they cost is gone
// afterwards.
func TestSlowlorisAndStreamFlood(t *testing.T) {
	h := start(t)
	waitReady(t, h)
	base := runtime.NumGoroutine()
	badBefore := testutil.ToFloat64(refused(h, proxy.RefuseBadHTTP))

	const slow = 20
	var wg sync.WaitGroup
	closedIn := make(chan time.Duration, slow)
	var started sync.WaitGroup // every slow client has sent its first header line
	started.Add(slow)
	for range slow {
		wg.Go(func() {
			c, err := net.Dial("tcp", h.addr(80))
			if err != nil {
				started.Done()
				t.Error(err)
				return
			}
			defer c.Close()
			start := time.Now()
			io.WriteString(c, "GET /v1 HTTP/1.1\r\nHost: echo.example.com\r\n")
			started.Done()
			done := make(chan struct{})
			go func() { io.Copy(io.Discard, c); close(done) }() // EOF when the proxy closes it
			for {
				select {
				case <-done:
					closedIn <- time.Since(start)
					return
				case <-time.After(time.Second):
					if _, err := io.WriteString(c, "X-Slow: 1\r\n"); err != nil {
						<-done
						closedIn <- time.Since(start)
						return
					}
					if time.Since(start) > 30*time.Second {
						t.Error("a slowloris connection was never closed")
						return
					}
				}
			}
		})
	}

	// The rapid-reset flood on one HTTP/2 connection.
	wg.Go(func() { flood(t, h.addr(443), 1000) })

	// Meanwhile (every slow client holding its connection) an ordinary client is served.
	started.Wait()
	if code, _, _ := get(t, h.client(true), "https://echo.example.com/v1/ok", ""); code != 200 {
		t.Errorf("an ordinary client got %d during the attacks", code)
	}
	wg.Wait()
	close(closedIn)
	for d := range closedIn {
		if d < 9*time.Second || d > 20*time.Second {
			t.Errorf("a slowloris connection was closed after %s, want about the 10 s header timeout", d)
		}
	}
	waitCounter(t, func() prometheus.Collector { return refused(h, proxy.RefuseBadHTTP) }, badBefore+slow)
	if code, _, _ := get(t, h.client(false), "https://echo.example.com/v1/after", ""); code != 200 {
		t.Errorf("after the attacks: %d", code)
	}
	h.client(false).CloseIdleConnections()
	h.client(true).CloseIdleConnections()
	deadline := time.Now().Add(15 * time.Second)
	for runtime.NumGoroutine() > base+10 {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after the attacks, %d before:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// flood opens an HTTP/2 connection and sends n requests, each reset at once, then reads
// until the proxy ends the connection or 15 s pass.
func flood(t *testing.T, addr string, n int) {
	c, err := tls.Dial("tcp", addr, &tls.Config{ServerName: "echo.example.com", InsecureSkipVerify: true, NextProtos: []string{"h2"}})
	if err != nil {
		t.Error(err)
		return
	}
	defer c.Close()
	if c.ConnectionState().NegotiatedProtocol != "h2" {
		t.Errorf("ALPN %q, want h2", c.ConnectionState().NegotiatedProtocol)
		return
	}
	io.WriteString(c, http2.ClientPreface)
	fr := http2.NewFramer(c, c)
	fr.WriteSettings()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "https"}, {":authority", "echo.example.com"}, {":path", "/v1/flood"}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	go func() {
		for i := range n {
			id := uint32(2*i + 1)
			if fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}) != nil {
				return
			}
			if fr.WriteRSTStream(id, http2.ErrCodeCancel) != nil {
				return
			}
		}
	}()
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return // closed by the proxy, or the deadline
		}
		if _, ok := f.(*http2.GoAwayFrame); ok {
			return
		}
	}
}
