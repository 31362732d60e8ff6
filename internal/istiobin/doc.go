// Package istiobin finds or builds Istio's own control plane and CLI — pilot-discovery
// (istiod) and istioctl — the peers that the Istio interop tests run against an Isthmus
// primary and Isthmus remote secrets.
//
// The binaries come from a cache outside the repository keyed by the istio.io/istio
// module version (<user cache dir>/isthmus/istio/istio-<version>/, or
// $ISTHMUS_ISTIO_CACHE/istio-<version>/), the way internal/kubebin caches the Kubernetes
// binaries. When they are missing, Ensure builds both in one `go build` of the tools/istio
// module of an Isthmus checkout (istio.io/istio from the Go module proxy, no cgo), 15-35
// minutes on a loaded machine the first time. Concurrent callers share one build through a
// file lock (internal/buildlock). istio.io/istio is never a dependency of the main module:
// it pins other k8s.io/* versions.
//
// Imported by tests and by its ensure command only.
package istiobin
