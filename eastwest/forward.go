package eastwest

import (
	"context"
	"net"
	"sync"
	"time"
)

// Forward passes TCP connections from l to target unchanged until ctx ends, for ports
// that need no routing: the control plane's xDS/CA (15012) and webhook (15017), reached
// by remote clusters through the gateway.
//
// It closes l when ctx ends and returns only after every connection's goroutine has
// ended; connections still open then are closed. A dial failure (5 s timeout) closes the
// client's connection: the client retries, as it would against the target itself.
func Forward(ctx context.Context, l net.Listener, target string) error {
	go func() { <-ctx.Done(); l.Close() }()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Go(func() {
			defer c.Close()
			d := net.Dialer{Timeout: 5 * time.Second}
			up, err := d.DialContext(ctx, "tcp", target)
			if err != nil {
				return
			}
			defer up.Close()
			// Each half propagates its end with CloseWrite, so a client that half-closes
			// still gets the rest of the answer (relay, the gateway's data path); done
			// has room for both, so neither half blocks when ctx ended first.
			done := make(chan struct{}, 2)
			var l link
			half := func(dst, src net.Conn) {
				relay(dst, src, &l)
				done <- struct{}{}
			}
			go half(up, c)
			go half(c, up)
			select {
			case <-done:
				<-done
			case <-ctx.Done():
			}
		})
	}
}
