// Package eastwest is the east-west gateway: it accepts TLS on port 15443, reads the SNI
// from the ClientHello without terminating the handshake, and forwards the connection to
// the named service's endpoints on its own network, so that mTLS stays end to end.
//
// Gateway is the proxy (limits, idle timeout, drain, metrics); Table the routing table;
// WatchRoutes fills it from a primary over ADS; Forward passes plain TCP through for the
// control plane's ports. See docs/eastwest.md.
//
// eastwest must never import client-go: it learns its routes over xDS only.
package eastwest
