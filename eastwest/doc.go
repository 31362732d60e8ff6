// Package eastwest is the east-west gateway: it accepts TLS on port 15443, reads the SNI
// from the ClientHello without terminating the handshake, and forwards the connection to
// the named service's endpoints on its own network, so that mTLS stays end to end.
//
// Gateway is the proxy (limits, idle timeout, drain, metrics); Table the routing table;
// WatchRoutes fills it from a primary over ADS; Forward passes plain TCP through for the
// control plane's ports. See docs/eastwest.md.
//
// Server names are parsed by mesh.ParseSNI into a mesh.OutboundName, whose ClusterName is
// the key the primary's clusters carry: the format is written once, in mesh.
//
// eastwest must never import client-go (it learns its routes over xDS only), nor
// internal/netlab, internal/proc or internal/kubebin (a data-plane process has no use for
// test topologies or cluster binaries); internal/imports pins both rules. cmd/isthmus
// (the gateway subcommand) and scenarios import it.
package eastwest
