// Package kindcluster starts and deletes kind clusters through sigs.k8s.io/kind's Go API,
// one cluster per call, on a container network the caller names (one per mesh network).
//
// It makes the network itself, with the subnet it is given, IP masquerading off and the
// uplink guard checked first, so no address is chosen by docker and nothing on it can
// leave the machine; kind finds the network existing and uses it. The API server is
// published on loopback, so the host reaches it without routes to container addresses.
// Clusters run without kind's default CNI: a bridge CNI configuration with the cluster's
// own pod range is mounted into the node (the node image has none, see
// internal/nodeimage).
package kindcluster
