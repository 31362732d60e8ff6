package eastwest

import (
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// Forward passes TCP connections from l to target unchanged until ctx ends, for ports
// that need no routing: the control plane's xDS/CA (15012) and webhook (15017), reached
// by remote clusters through the gateway.
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
			done := make(chan struct{}, 2)
			half := func(dst, src net.Conn) {
				io.Copy(dst, src)
				if cw, ok := dst.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				}
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
