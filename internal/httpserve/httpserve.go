package httpserve

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"
)

// DefaultGrace is how long requests in flight get to finish, once the context ends,
// before they are cut off. The endpoints served this way carry readiness, metrics, debug
// pages and probes, so a few seconds is plenty, and a stop must not hang on a slow
// scraper.
const DefaultGrace = 5 * time.Second

// readHeaderTimeout bounds how long a client may take to send its request headers, so a
// slow-loris client cannot hold a connection (and a goroutine) open for ever.
const readHeaderTimeout = 10 * time.Second

// Serve serves handler on ln until ctx ends, then shuts the server down gracefully: it
// stops accepting, lets requests in flight finish for up to grace (DefaultGrace when
// grace is zero or negative), and closes what is still open after that. It returns nil
// after a shutdown, or the error that made serving stop before ctx ended (the listener
// failed). It always closes ln.
func Serve(ctx context.Context, ln net.Listener, handler http.Handler, grace time.Duration) error {
	if grace <= 0 {
		grace = DefaultGrace
	}
	hs := &http.Server{Handler: handler, ReadHeaderTimeout: readHeaderTimeout}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	select {
	case err := <-served:
		return err // Serve never returns nil; ErrServerClosed cannot happen before Shutdown
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil {
		hs.Close() // the grace ran out: cut off the requests still running
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
