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
// A topology may also carry faults (fault.go: a partition, a gateway or primary killed, an
// API server stopped, a CA cut off, a root rotation, each with a start and a duration),
// load (every client's workload runs a generator of proxyless gRPC calls, loadgen.go) and
// expectations per phase (phases.go). RunFaults applies and restores the faults on
// schedule under the load, cuts the calls into phases before, during and after each, and
// judges every cell's timeline; in soak mode it repeats the faults and samples every
// process's memory and goroutines.
//
// A topology's traffic section (traffic.go) is Istio configuration applied to every
// primary's cluster and checks measured from the clients' calls (shares per cluster,
// failures and their codes, failing pods, failover and back); RunTraffic runs them.
//
// The local provider runs internal/kubelocal clusters, network namespaces
// (internal/netlab) and every component as a process of the isthmus binary. RunWorkload is
// that binary's workload program. Only cmd/isthmus imports this package.
package scenarios
