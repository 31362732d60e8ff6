// Package spirebin finds or builds a real SPIRE server (spire-server), the peer that
// multi-trust interop tests federate an Isthmus primary with.
//
// The binary comes from a cache outside the repository keyed by version
// (<user cache dir>/isthmus/spire/spire-<version>/spire-server, or $ISTHMUS_SPIRE_CACHE),
// the way internal/kubebin caches the Kubernetes binaries. When it is missing, Ensure
// builds it from the tools/spire module of an Isthmus checkout (github.com/spiffe/spire
// from the Go module proxy, cgo for sqlite3), which takes about 15 minutes on a loaded
// machine the first time. Concurrent callers share one build through a file lock.
//
// Imported by tests only.
package spirebin
