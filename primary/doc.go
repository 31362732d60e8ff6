// Package primary is the Isthmus control plane: one watcher per cluster (the local config
// cluster and every remote cluster it holds credentials for) feeds a registry of services
// merged by hostname, a pure snapshot builder turns the registry into per-proxy xDS
// resources with split-horizon endpoints, and an xDS server pushes them to Envoy, proxyless
// gRPC clients and the east-west gateway.
//
// Status: not yet built (issue "primary: discover services and endpoints across clusters").
// The package exists so that the layout, and the import rules in internal/imports, hold
// from the start.
//
// primary may import mesh, remote, trust and internal packages; it must not import deploy,
// scenarios or cmd.
package primary
