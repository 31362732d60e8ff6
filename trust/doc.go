// Package trust is the certificate authority layer: roots and name-constrained
// per-cluster intermediates in Istio's plug-in CA layout, and the CA server that
// implements Istio's CSR API (istio.v1.auth.IstioCertificateService) with
// service-account-token authentication by TokenReview in the caller's own cluster.
//
// Built so far: Authority (NewRoot, NewIntermediate, ParsePlugged, LoadDir, WriteDir),
// Sign, and Server. Still to come (see docs/trust.md): delivery to workloads (SDS, files),
// SPIFFE trust bundles and the bundle endpoint, root rotation, and cert-manager as signer.
//
// Imported by primary and cmd; it must not import primary.
package trust
