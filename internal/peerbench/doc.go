// Package peerbench measures the Isthmus east-west gateway side by side with the SNI
// routers operators would run instead: nginx (stream with ssl_preread) and HAProxy
// (req.ssl_sni), both from Debian's packages.
//
// Ensure installs the peers with apt-get when they are missing. Run writes their
// configurations for the same SNI routes the gateway gets, starts the three relays as
// separate processes (one worker or thread each: nginx worker_processes 1, HAProxy nbthread
// 1, the gateway with GOMAXPROCS=1), drives them interleaved, round after round, with the
// same client and backend on loopback, reads each relay's CPU from /proc/<pid>/stat and its
// memory and descriptors from /proc, and reports medians per relay and the gateway's ratios
// against each peer (Table).
//
// The gateway runs as a re-execution of the calling binary: a program or test that calls
// Run must call ServeGatewayIfChild first thing in main or TestMain. The child serves
// eastwest.Gateway, the code `isthmus gateway` runs, with a static route table instead of
// one learnt over xDS.
//
// RunHTTP (http.go) does the same for the ingress data plane: `isthmus proxy`'s HTTP path
// (proxy.Proxy, re-executed like the gateway) beside nginx as a reverse proxy and a
// direct call, HTTP/1.1 keep-alive and HTTP/2, requests per second, latency and requests
// per relay CPU second.
//
// Imported by internal/peerbench/benchpeers (`make bench-peers`) and this package's test,
// which runs a short round in CI so that the harness cannot rot.
package peerbench
