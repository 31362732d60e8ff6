// Package netlab makes separate networks on one Linux machine for tests and local
// scenarios: each Namespace is a network namespace with its own addresses, and code runs
// inside it through Do, Listen and Dial, which switch one locked OS thread into the
// namespace for the moment a socket is made.
//
// Addresses inside a namespace exist only there: nothing is routed to or from the host,
// so traffic to them never leaves the machine. Never dial them from the host's own network
// namespace (its default route leads off the machine); use Namespace.Dial.
//
// Creating namespaces needs root (CAP_SYS_ADMIN) and the ip command (iproute2). Imported by
// tests and, later, the scenario runner.
package netlab
