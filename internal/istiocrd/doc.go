// Package istiocrd installs Istio's CustomResourceDefinitions on a cluster, so that the
// API server validates users' Istio YAML exactly as a cluster with Istio installed does.
//
// The definitions are data, not code: networking.gen.yaml is the VirtualService,
// DestinationRule, Gateway, ServiceEntry and Sidecar documents of kubernetes/customresourcedefinitions.gen.yaml
// from the istio.io/api module at the version go.mod pins, and security.gen.yaml its
// AuthorizationPolicy and PeerAuthentication documents (tests keep each equal to the
// module, so an API upgrade that changes them fails until the file is refreshed).
//
// Imported by local-cluster tests and tools; it imports only client libraries.
package istiocrd
