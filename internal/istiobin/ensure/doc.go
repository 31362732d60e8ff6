// Command ensure builds istiod (pilot-discovery) and istioctl, the peers of the Istio
// interop tests, into their cache (once per version) and prints the cache directory.
// .ci/run and `make peers` call it before the tests, so that no test spends its own
// timeout on a cold build, and the interop tests skip only when it has not run:
//
//	go run ./internal/istiobin/ensure
package main
