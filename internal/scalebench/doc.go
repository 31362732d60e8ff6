// Package scalebench measures the primary at scale with in-process sources: a primary
// whose registry holds 10, 100 or 1,000 clusters, fed exactly as cluster watchers feed it
// (one ReplaceShard per cluster when it syncs, one UpdateService per changed service),
// serving xDS to many connected clients.
//
// The primary runs in a child process, a re-execution of the calling binary, so that its
// memory and CPU are its own and the clients' (this process) are not counted: a program
// or test that calls Run must call ServeIfChild first thing in main or TestMain. The
// child fills its registry, serves plaintext ADS on loopback and a small control API
// (apply a change, report heap, CPU and xDS bytes sent). The parent connects raw ADS
// clients (state of the world or delta, proxyless gRPC nodes), applies isolated changes
// one at a time and times each until every client subscribed to the changed service has
// it.
//
// Imported by internal/scalebench/benchscale (`make bench-scale`) and this package's
// test, which runs a short case in CI so that the harness cannot rot.
package scalebench
