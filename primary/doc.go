// Package primary is the Isthmus control plane.
//
// One clusterWatcher per cluster (the local config cluster, every cluster named in a
// remote secret, every file of a kubeconfig directory) keeps a Registry shard current from
// client-go informers. The Registry merges shards by hostname into immutable Views,
// re-merging only hostnames that changed. A Builder turns a View into the xDS resources of
// one proxy view (proxyless gRPC, Envoy sidecar or gateway, on one network), with
// split-horizon endpoints; it is a pure function memoised per service. The viewCache
// serves those resources through go-control-plane's ADS server (state of the world and
// delta), marshalling each resource once for every proxy of a view.
//
// Link health: each cluster is probed; an unreachable cluster keeps its endpoints for
// Config.StaleWindow, then loses them, and gets them back when it answers again (see
// docs/primary.md for the policy and why).
//
// primary imports mesh, remote and client-go; it must not import deploy, scenarios or cmd.
package primary
