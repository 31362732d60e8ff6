// Package federation peers whole meshes (docs/federation.md): peering tokens with a
// one-time secret, the peering state machine, the memberlist gossip pool that carries
// membership and health between the federation endpoints of peered meshes, and the
// catalogs of exported services that peers validate strictly before importing.
//
// It imports mesh and trust (certificates and bundles for the federation endpoints). It
// never imports primary: imported services leave through a small interface declared
// here, which cmd/isthmus adapts to the primary's registry.
package federation
