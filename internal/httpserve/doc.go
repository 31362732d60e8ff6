// Package httpserve runs an HTTP server for the lifetime of a context: the one place the
// daemons (isthmus primary, gateway) and the scenario workload serve their readiness,
// metrics, debug and probe endpoints, so that all of them bound request headers and stop
// the same way.
//
// It imports only the standard library; cmd/isthmus and scenarios import it.
package httpserve
