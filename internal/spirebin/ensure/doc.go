// Command ensure builds the SPIRE server that the multi-trust interop tests federate with
// into its cache (once per version) and prints its path. .ci/run and `make peers` call it
// before the tests, so that no test spends its own timeout on a cold build:
//
//	go run ./internal/spirebin/ensure
package main
