package trust

import (
	"bytes"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCAClientTLSFollowsTheAgentsRoots dials a real TLS server whose certificate chains
// to a root the workload was not started with: refused while only the bootstrap root is
// known, accepted once the agent's root file holds the new root too (as it does after a
// CSR response during a rotation), and refused for a wrong server name.
func TestCAClientTLSFollowsTheAgentsRoots(t *testing.T) {
	oldRoot, err := NewRoot("cluster.local", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	newRoot, err := NewRoot("cluster.local", RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := newRoot.NewIntermediate(IntermediateOptions{Cluster: "c1"})
	if err != nil {
		t.Fatal(err)
	}
	serving, err := inter.ServingCertificate([]string{"istiod.istio-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{serving}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { c.(*tls.Conn).Handshake(); c.Close() }()
		}
	}()

	dir := t.TempDir()
	dial := func(name string) error {
		tc, err := CAClientTLS(oldRoot.RootPEM(), dir, name)
		if err != nil {
			t.Fatal(err)
		}
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), tc)
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := dial("istiod.istio-system.svc"); err == nil {
		t.Fatal("a CA under a root the workload does not hold was accepted")
	}
	// The agent's file during a rotation: both anchors.
	both := bytes.Join([][]byte{oldRoot.RootPEM(), newRoot.RootPEM()}, nil)
	if err := os.WriteFile(filepath.Join(dir, AgentRootFile), both, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := dial("istiod.istio-system.svc"); err != nil {
		t.Fatalf("with the agent's roots: %v", err)
	}
	if err := dial("evil.example"); err == nil || !strings.Contains(err.Error(), "evil.example") {
		t.Fatalf("wrong server name: %v", err)
	}
	if _, err := CAClientTLS([]byte("not pem"), dir, "x"); err == nil {
		t.Fatal("bootstrap roots without a certificate were accepted")
	}
}
