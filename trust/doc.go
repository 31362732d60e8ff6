// Package trust is the certificate authority layer: roots and per-cluster intermediates,
// the Istio-compatible CSR service, delivery to workloads, SPIFFE trust bundles and root
// rotation.
//
// Status: not yet built (issue "trust"). Imported by primary and cmd.
package trust
