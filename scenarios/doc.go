// Package scenarios brings deployment models up on real clusters and checks them end to
// end.
//
// A Topology (data, read from YAML) names clusters, networks, the control-plane and trust
// models, workloads and the expected reachability. A Provider makes the clusters and
// networks; the runner (Up) fills them through the Kubernetes API and the provider's
// Environment: namespaces, Services, remote secrets, a root and per-primary
// intermediates, primaries, east-west gateways and workloads. Check then calls every
// service from a client in every cluster and compares what answered, by which path and
// with which identities, with the topology's expectations.
//
// The local provider runs internal/kubelocal clusters, network namespaces
// (internal/netlab) and every component as a process of the isthmus binary. RunWorkload is
// that binary's workload program. Only cmd/isthmus imports this package.
package scenarios
