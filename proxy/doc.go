// Package proxy is isthmus proxy: a data plane that consumes the Envoy-shaped xDS the
// primary serves (LDS, RDS, CDS, EDS and SDS over one ADS stream) and carries the
// traffic it describes, so the flow runs where Envoy cannot be installed and Envoy stays a
// drop-in on real clusters. Mode ingress (the only one so far) serves the listeners of an
// ingress gateway: plaintext HTTP/1.1 and h2c, HTTPS with the certificates SDS delivers
// (chosen by SNI), TLS passed through by SNI and TCP, spliced with eastwest's data path.
// HTTP is proxied with net/http/httputil.ReverseProxy over golang.org/x/net/http2, so
// gRPC passes through with its trailers.
//
// The translation (config.go) implements the subset of each resource the primary emits
// and refuses a response naming the first field it does not implement, which the ADS
// client (xds.go) sends back as a NACK; the previous configuration stays in force. The
// route matcher (match.go) is pure and fuzzed. docs/proxy.md has the field table.
package proxy
