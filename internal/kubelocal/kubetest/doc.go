// Package kubetest starts real local clusters for integration tests.
//
// Integration tests call Start (one test) or StartShared (from TestMain, so that the
// tests of a package share clusters). Both skip under `go test -short`, which the unit-test
// run uses; every other run, CI included, builds the binaries if they are missing and runs
// the clusters for real.
package kubetest
