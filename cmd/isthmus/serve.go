package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"

	"github.com/isthmus-mesh/isthmus/internal/httpserve"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// shutdownGrace is how long a daemon's HTTP and gRPC servers get, once their context
// ends, to finish the requests in flight before they are cut off (see httpserve).
const shutdownGrace = httpserve.DefaultGrace

// serveHTTP serves a daemon's HTTP endpoint (readiness, metrics, debug) on ln until ctx
// ends, then shuts it down within shutdownGrace; see httpserve.Serve.
func serveHTTP(ctx context.Context, ln net.Listener, handler http.Handler) error {
	return httpserve.Serve(ctx, ln, handler, shutdownGrace)
}

// openListeners are the listeners a daemon has opened so far. A daemon opens all of its
// addresses before it serves any, and a failure to open one closes the ones before it:
// it starts on all of its addresses or on none, and a port conflict is reported before
// anything answers.
type openListeners []net.Listener

// listen opens addr with open (net.Listen, or a function that listens inside a network
// namespace) and keeps the listener; on failure it closes every listener kept so far and
// returns the error prefixed with what (a flag name, or what the listener is for).
func (o *openListeners) listen(open func(network, addr string) (net.Listener, error), addr, what string) (net.Listener, error) {
	l, err := open("tcp", addr)
	if err != nil {
		o.close()
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	*o = append(*o, l)
	return l, nil
}

// close closes every listener kept, for a daemon that gives up before serving.
func (o *openListeners) close() {
	for _, l := range *o {
		l.Close()
	}
	*o = nil
}

// daemonLogger is a daemon's logger: slog text on w (stderr) at the --log-level given
// (debug, info, warn or error), refused with the flag's name otherwise.
func daemonLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

// daemonRegistry is a daemon's metrics registry, with the Go runtime and process
// collectors every scrape expects; the daemon's packages register their own metrics in
// it, and /metrics serves it. It is explicit, never the global default registry, so a
// package's metrics appear only where a daemon registers them.
func daemonRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
