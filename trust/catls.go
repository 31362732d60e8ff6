package trust

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// CAClientTLS is the TLS configuration a workload's agent dials its CA (and the secure xDS
// port beside it) with. The CA's serving certificate is verified for serverName against
// the bootstrap roots (the root the workload was started with, bootstrapPEM) together with
// the anchors in dir/root-cert.pem, the file the Agent rewrites from every CSR response.
//
// Reading the agent's file at each handshake is what keeps renewals working through a
// root rotation: once the CA is re-issued under a new root (and a restarted primary serves
// a certificate from the new chain), the bootstrap root alone no longer verifies it, but
// the agent already holds the new root — every CA response during a rotation carries all
// anchors. A missing or unreadable file (before the first certificate) falls back to the
// bootstrap roots.
func CAClientTLS(bootstrapPEM []byte, dir, serverName string) (*tls.Config, error) {
	return RootFileTLS(bootstrapPEM, filepath.Join(dir, AgentRootFile), serverName)
}

// RootFileTLS is a client TLS configuration that verifies the server's certificate for
// serverName against the bootstrap roots together with the anchors in rootFile, read at
// every handshake: a client that reconnects after a root rotation trusts what the file
// holds by then. A missing, unreadable or empty file adds nothing, so a file caught being
// replaced never fails a handshake the bootstrap roots pass. CAClientTLS is this over the
// agent's root file; an east-west gateway uses it over its --xds-root-cert file, which
// its deployment keeps current (Istio's istio-ca-root-cert ConfigMap, the plug-in CA's
// root-cert.pem).
func RootFileTLS(bootstrapPEM []byte, rootFile, serverName string) (*tls.Config, error) {
	boot := x509.NewCertPool()
	if !boot.AppendCertsFromPEM(bootstrapPEM) {
		return nil, errors.New("trust: CA client: the bootstrap roots hold no PEM certificate")
	}
	if serverName == "" {
		return nil, errors.New("trust: CA client: no server name to verify")
	}
	verify := func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("trust: CA presented no certificate")
		}
		roots := boot.Clone()
		if data, err := os.ReadFile(rootFile); err == nil {
			roots.AppendCertsFromPEM(data) // a torn or empty file adds nothing; boot still counts
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
			DNSName: serverName, Roots: roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}); err != nil {
			return fmt.Errorf("trust: CA certificate for %s: %w", serverName, err)
		}
		return nil
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// The standard verification uses a fixed pool; VerifyConnection does the same
		// checks (chain, name, usage) against a pool read at handshake time instead.
		InsecureSkipVerify: true,
		VerifyConnection:   verify,
	}, nil
}
