// Package kubebin finds or builds the real Kubernetes and etcd binaries that local
// clusters run: kube-apiserver, kube-controller-manager, kubectl and etcd.
//
// Binaries come, per binary, from an envtest assets directory (KUBEBUILDER_ASSETS) when it
// holds them, otherwise from a cache outside the repository keyed by version
// (<user cache dir>/isthmus/k8s/<key>/). When the cache lacks any of them, Ensure builds all
// four from the tools/k8s module of an Isthmus checkout with `go build`, which takes minutes
// the first time; progress is reported as it goes. Concurrent callers, such as the test
// binaries of several packages, share one build through a file lock.
//
// Imported by internal/kubelocal and cmd.
package kubebin
