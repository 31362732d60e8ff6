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
// The secure port (RegisterSecureXDS, on the CA's TLS server) authenticates every stream
// with an Authenticator — the CA server, plugged in by cmd — and binds the node's
// namespace, service account, cluster and network to what the stream proved (auth.go);
// plaintext xDS (RegisterXDS) believes every node and is only served when asked for.
//
// Traffic management: with Config.IstioClient set, Istio's VirtualServices and
// DestinationRules are read from the config cluster (istio.io/client-go informers, once
// the CRDs exist) into the Registry; the Builder plans them once per View (each object
// applied whole or refused with a reason on /debug/configz) and adds subset clusters and
// routes. docs/traffic.md lists every supported field.
//
// Security: AuthorizationPolicies and PeerAuthentications are read the same way
// (securityconfig.go), planned once per SecurityConfig (authz.go: rules to RBAC, failing
// closed when refused), and become inbound Listeners for xDS-enabled gRPC servers — pods
// labelled LabelXDSServer — in the proxyless view of their network (inbound.go, gRFC A36
// and A41). BuildSidecarInbound is the Envoy translation, not served yet.
//
// Link health: each cluster is probed; an unreachable cluster keeps its endpoints for
// Config.StaleWindow, then loses them, and gets them back when it answers again (see
// docs/primary.md for the policy and why).
//
// Wire names (cluster names, server names, SDS secret and certificate-provider names)
// come from mesh; Istio's labels from istio.io/api/label. The builder's output per proxy
// kind is pinned by testdata/*.golden (go test ./primary -short -run Golden -update).
//
// primary imports mesh, remote, client-go and istio.io/client-go; it must not import deploy, scenarios, cmd,
// trust or cert-manager (internal/imports pins this). cmd/isthmus (the primary and status
// subcommands) and scenarios import it.
package primary
