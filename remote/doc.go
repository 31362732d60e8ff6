// Package remote makes and reads remote-cluster credentials: the least-privilege reader
// identity created in a remote cluster, and the Istio-format remote secret (label
// istio/multiCluster=true, each data key a cluster ID, each value a kubeconfig) that a
// primary reads to watch that cluster.
//
// Status: not yet built (issue "primary"). Imported by primary and cmd.
package remote
