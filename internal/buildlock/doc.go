// Package buildlock is the file lock that lets several processes (parallel test packages,
// CI and a developer's shell) share one slow build of a cached binary: the first takes the
// lock and builds, the others wait for it and then find the binary in the cache.
//
// It imports only the standard library; internal/kubebin and internal/spirebin import it.
package buildlock
