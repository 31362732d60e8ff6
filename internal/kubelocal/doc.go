// Package kubelocal runs real Kubernetes clusters on one machine: each cluster is etcd,
// kube-apiserver and kube-controller-manager as child processes with their own PKI, ports,
// data directory and admin kubeconfig, plus a node agent that plays the kubelet's part for
// Pods (binding them and reporting them Running and Ready with a chosen IP), so that the
// real endpoint controllers publish EndpointSlices and service-account tokens are real.
//
// Clusters started by tests are tied to the test process (process groups and a
// parent-death signal), so a failed, panicking or interrupted test leaves nothing behind.
// Clusters started by `isthmus cluster up` are detached and recorded in a state file
// (cluster.json) from which ListStates and StopDetached find and stop them.
//
// Imported by cmd, tests and (later) the scenario runner; it imports internal/kubebin.
package kubelocal
