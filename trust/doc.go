// Package trust is the certificate authority layer: roots and name-constrained
// per-cluster intermediates in Istio's plug-in CA layout, and the CA server that
// implements Istio's CSR API (istio.v1.auth.IstioCertificateService) with
// service-account-token authentication by TokenReview in the caller's own cluster.
//
// Every certificate the package mints goes through one function (issue, issue.go): one
// serial-number source, one clock-skew allowance, nothing outliving its issuer. PEM
// encoding and decoding live in pem.go. Signing is one interface, Signer: *Authority signs
// locally, CertManagerSigner through cert-manager, and the Server uses either the same way.
//
// What runs in a process today:
//   - Authority (NewRoot, NewIntermediate, ParsePlugged, LoadDir, WriteDir): `isthmus
//     trust init-root` and `isthmus trust intermediate`.
//   - Server, ReloadDir and Server.DebugHandler (/debug/trustz), with CertManagerSigner
//     when asked: `isthmus primary --ca-dir [--cert-manager-issuer]`.
//   - Agent (requests and renews a workload's certificate, writes the files grpc-go's
//     file_watcher provider reads): `isthmus workload`, the scenario runner's pods.
//   - Rotate (root rotation without downtime): `isthmus trust rotate`.
//   - BundleStore, ReadBundle, FetchBundle: `isthmus trust bundle show|add|remove|alias`.
//   - BundleEndpoint (the trust domain's SPIFFE bundle endpoint, https_spiffe or
//     https_web) and Federation (relationships in the isthmus-trust-federation ConfigMap,
//     each peer's bundle fetched on its refresh hint, refusals with reasons, the bundles
//     in force written to the bundle store): `isthmus primary --ca-dir --bundle-addr`;
//     relationships managed by `isthmus trust federate`, state read by `isthmus trust
//     status`.
//   - WatchBundleStore, the SPIFFE bundle map writer and BundleSet.VerifyPeer: the
//     scenario workloads (grpc-go reads the map; servers verify callers per domain); with
//     SDS, `isthmus agent --sds-socket` for Envoy.
//   - RotateConfig.Peers: rotation across federated domains, `isthmus trust rotate
//     --peer-primary`.
//
// Still library only: BundleHandler and WatchBundle, the first bundle endpoint and
// watcher, superseded by BundleEndpoint and Federation and used only by tests now.
// See docs/trust.md.
//
// Imported by scenarios and cmd (never by primary: the CA is plugged in beside it); it
// imports mesh and no other Isthmus package.
package trust
