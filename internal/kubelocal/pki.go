package kubelocal

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pkiFiles are the paths of one cluster's credentials, all under <dir>/pki.
type pkiFiles struct {
	CACert, CAKey                 string
	ServingCert, ServingKey       string
	AdminCert, AdminKey           string
	ControllerCert, ControllerKey string
	SAPublic, SAPrivate           string
}

func newPKIFiles(dir string) pkiFiles {
	p := func(n string) string { return filepath.Join(dir, n) }
	return pkiFiles{
		CACert: p("ca.crt"), CAKey: p("ca.key"),
		ServingCert: p("apiserver.crt"), ServingKey: p("apiserver.key"),
		AdminCert: p("admin.crt"), AdminKey: p("admin.key"),
		ControllerCert: p("controller-manager.crt"), ControllerKey: p("controller-manager.key"),
		SAPublic: p("sa.pub"), SAPrivate: p("sa.key"),
	}
}

// pkiRequest says what the cluster's certificates must cover.
type pkiRequest struct {
	Name      string   // cluster name, used in subjects
	ServingIP []net.IP // addresses the API server is reached at
	ServiceIP net.IP   // first address of the service CIDR (the kubernetes Service)
	Domain    string   // cluster DNS domain
}

// writePKI creates a fresh CA and every certificate and key one cluster needs: the API
// server's serving certificate, an admin client certificate (system:masters), one for the
// controller manager, and the service-account signing key pair. ECDSA P-256 keeps
// generation in the milliseconds. Every call makes a new CA and keys and overwrites the
// files, so kubeconfigs and service-account tokens from an earlier start of the same Dir
// stop working. Keys are written 0600; certificates are valid for five years, from a
// minute before now.
func writePKI(dir string, req pkiRequest) (pkiFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return pkiFiles{}, err
	}
	f := newPKIFiles(dir)
	now := time.Now().Add(-time.Minute)
	notAfter := now.Add(5 * 365 * 24 * time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "isthmus-local-" + req.Name + "-ca"},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return f, fmt.Errorf("create CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return f, err
	}
	if err := writeCertKey(f.CACert, f.CAKey, caDER, caKey); err != nil {
		return f, err
	}

	// The serving certificate covers every name a client may use: loopback, the bind
	// address, and the kubernetes Service's names and ClusterIP (in-cluster clients).
	dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc." + req.Domain}
	ips := append([]net.IP{net.IPv4(127, 0, 0, 1), req.ServiceIP}, req.ServingIP...)
	leaves := []struct {
		cert, key string
		tmpl      *x509.Certificate
	}{
		{f.ServingCert, f.ServingKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: "kube-apiserver"},
			DNSNames:    dns,
			IPAddresses: ips,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		}},
		{f.AdminCert, f.AdminKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: "isthmus-admin", Organization: []string{"system:masters"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
		// The controller manager runs every controller under its own credentials here
		// (no --use-service-account-credentials), so it needs broad rights.
		{f.ControllerCert, f.ControllerKey, &x509.Certificate{
			Subject:     pkix.Name{CommonName: "system:kube-controller-manager", Organization: []string{"system:masters"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}},
	}
	for _, l := range leaves {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return f, err
		}
		l.tmpl.SerialNumber = serial()
		l.tmpl.NotBefore, l.tmpl.NotAfter = now, notAfter
		l.tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := x509.CreateCertificate(rand.Reader, l.tmpl, caCert, key.Public(), caKey)
		if err != nil {
			return f, fmt.Errorf("create %s: %w", l.tmpl.Subject.CommonName, err)
		}
		if err := writeCertKey(l.cert, l.key, der, key); err != nil {
			return f, err
		}
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return f, err
	}
	if err := writeKey(f.SAPrivate, saKey); err != nil {
		return f, err
	}
	pub, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return f, err
	}
	if err := os.WriteFile(f.SAPublic, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return f, err
	}
	return f, nil
}

// serial returns a random 126-bit serial number (positive, under the 20 octets RFC 5280
// allows).
func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		// crypto/rand does not fail on Linux; a time-based serial is still a valid cert.
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}

func writeCertKey(certPath, keyPath string, der []byte, key crypto.Signer) error {
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return writeKey(keyPath, key)
}

func writeKey(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
}
