// Package eastwest is the east-west gateway: it accepts TLS on port 15443, reads the SNI
// from the ClientHello without terminating the handshake, and forwards the connection to
// the named service's endpoints on its own network, so that mTLS stays end to end.
//
// Status: not yet built (issue "eastwest"). It must never import client-go: it learns its
// routes over xDS only.
package eastwest
