// Package mesh is the shared vocabulary of Isthmus: identifiers of clusters, networks,
// meshes and trust domains, workload identities, service names, localities and endpoints.
//
// Every value is parsed once, at the edge where it enters the program, into a small value
// type whose zero value means "unset" and whose String method gives back the canonical form.
// Parsers return precise errors naming the offending input, never panic, and are
// fuzz-tested to round-trip.
//
// Every other Isthmus package may import mesh. mesh itself imports only the standard
// library, so that it can never grow into a hub that drags dependencies along (a test in
// internal/imports pins this).
package mesh
