package mesh

// Names a workload's certificates travel under, in Istio's spelling, so that Istio's
// agents, Envoy and grpc-go bootstraps written for Istio work unchanged. They are wire
// vocabulary: the primary writes them into xDS, the trust package serves them over SDS
// and workload bootstraps declare them; each side must agree byte for byte.
const (
	// SDSIdentitySecret is the SDS secret holding the workload's certificate chain and key.
	// Proxyless gRPC uses the same string as the certificate name of its identity within
	// the certificate provider instance.
	SDSIdentitySecret = "default"
	// SDSRootSecret is the SDS secret holding the validation context: the roots peers are
	// verified against. Proxyless gRPC uses it as the certificate name of its roots.
	SDSRootSecret = "ROOTCA"
	// CertProviderInstance is the certificate provider instance a proxyless gRPC
	// client's bootstrap defines (a file_watcher over the agent's files) and its
	// clusters' transport sockets name.
	CertProviderInstance = "default"
)
