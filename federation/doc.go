// Package federation peers whole meshes: membership by gossip, exported and imported
// service catalogs, peering states, and the exchange of trust bundles.
//
// Status: not yet built. Imported by primary (as one more endpoint source) and cmd.
package federation
