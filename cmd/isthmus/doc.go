// Command isthmus is the one Isthmus binary: the daemons (primary, gateway, ...) and the
// operator CLI are its subcommands. Flags are mapped to the library packages'
// configuration structs here and nowhere else; no package imports cmd. What a subcommand
// does beyond parsing flags and wiring packages together belongs in a package, with its
// tests there.
//
// Daemons (run until interrupted, then shut down gracefully):
//
//	isthmus primary                     control plane: watch clusters, serve xDS; with --ca-dir also
//	                                    Istio's CSR API (its own CA or --cert-manager-issuer) and
//	                                    authenticated xDS on the same TLS port, reloading the CA
//	                                    directory when it changes; --bundle-addr serves the SPIFFE
//	                                    bundle endpoint
//	isthmus gateway                     east-west gateway: route TLS by SNI without terminating it
//	isthmus workload                    (hidden) one scenario pod: certificate agent, mTLS echo server,
//	                                    probes over proxyless xDS; started by the scenario runner
//	isthmus cluster node-agent          (hidden) a local cluster's node agent; started by cluster up
//
// Scenarios and local clusters:
//
//	isthmus up [NAME] / down [NAME]     bring a scenario up on local clusters and keep it running / stop it
//	isthmus scenario list|show|run      the built-in deployment-model scenarios; run checks every expectation
//	isthmus cluster up --clusters 2     start real local clusters that keep running
//	isthmus cluster list                show them, with API URLs and kubeconfig paths
//	isthmus cluster down [NAME...]      stop them and remove everything they wrote
//	isthmus cluster binaries            build (once per version) the etcd and Kubernetes binaries
//
// Operating a mesh:
//
//	isthmus remote-secret create        a least-privilege reader in a remote cluster, as an Istio remote secret
//	isthmus status                      a running primary's clusters: link state, sync, staleness, errors
//	isthmus trust init-root             a root CA for a trust domain
//	isthmus trust intermediate          a cluster's name-constrained intermediate CA (files or Secret cacerts)
//	isthmus trust rotate                replace the root without downtime: publish, reissue, retire
//	isthmus trust bundle show|add|remove|alias
//	                                    a cluster's bundle store (peer domains' roots), which the
//	                                    primaries' federation writes and workloads' agents follow
//	isthmus trust federate add|remove|list
//	                                    federation relationships with other trust domains
//	isthmus trust status                each primary's peer bundles: sequence, last success, errors
//	isthmus agent --sds-socket          a workload's trust agent serving SDS to Envoy on a Unix socket
//	isthmus version                     this binary's version and the Kubernetes version it runs
package main
