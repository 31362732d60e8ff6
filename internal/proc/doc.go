// Package proc starts and stops the child processes Isthmus runs on a machine: the local
// clusters' etcd and Kubernetes binaries, and the scenario runner's primaries, gateways and
// workloads. Every child has its own process group and log file; attached children die with
// their parent, detached ones are found again through their recorded process IDs.
//
// It is plumbing for internal/kubelocal and scenarios; it imports only the standard library.
package proc
