package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/isthmus-mesh/isthmus/trust"
)

// servePrimaryTLS serves gRPC health on addr with a certificate for
// istiod.istio-system.svc from ca, as the primary's secure port does; it returns the
// server to stop.
func servePrimaryTLS(t *testing.T, addr string, ca *trust.Authority) *grpc.Server {
	t.Helper()
	cert, err := ca.ServingCertificate([]string{"istiod.istio-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("listen %s: %v", addr, err)
		}
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})))
	healthpb.RegisterHealthServer(g, health.NewServer())
	go g.Serve(ln)
	return g
}

// TestXDSTLSFollowsARootRotation is a gateway's xDS connection through a root rotation:
// the rotation rewrites the gateway's --xds-root-cert file (both roots, then only the new
// one), and the primary, restarted after it, serves a certificate from the new root. The
// gateway's channel, dialed before the rotation, reconnects and is served. (With the roots
// read once at start it never got through again.) A primary under a root the file never
// named is refused.
func TestXDSTLSFollowsARootRotation(t *testing.T) {
	oldRoot, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	newRoot, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	oldInter, _ := oldRoot.NewIntermediate(trust.IntermediateOptions{Cluster: "c1"})
	newInter, _ := newRoot.NewIntermediate(trust.IntermediateOptions{Cluster: "c1"})
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	write := func(pems ...[]byte) {
		t.Helper()
		// As a ConfigMap or the rotation's atomic write replaces it: a new file renamed over.
		tmp := rootFile + ".tmp"
		if err := os.WriteFile(tmp, bytes.Join(pems, nil), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, rootFile); err != nil {
			t.Fatal(err)
		}
	}
	write(oldRoot.RootPEM())

	addr := freeAddr(t)
	srv := servePrimaryTLS(t, addr, oldInter)
	tc, err := xdsTLS(rootFile, "istiod.istio-system.svc")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	check := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := check(); err != nil {
		t.Fatalf("before the rotation: %v", err)
	}

	write(oldRoot.RootPEM(), newRoot.RootPEM()) // publish
	write(newRoot.RootPEM())                    // retire
	srv.Stop()                                  // the primary restarts, serving from the new chain
	srv = servePrimaryTLS(t, addr, newInter)
	defer func() { srv.Stop() }()
	var last error
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if last = check(); last == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the channel did not get through to the primary restarted under the new root: %v", last)
		}
	}

	// A primary whose root the file never held is refused, on a fresh channel.
	strangerRoot, _ := trust.NewRoot("cluster.local", trust.RootOptions{})
	strangerInter, _ := strangerRoot.NewIntermediate(trust.IntermediateOptions{Cluster: "c1"})
	strangerAddr := freeAddr(t)
	stranger := servePrimaryTLS(t, strangerAddr, strangerInter)
	defer stranger.Stop()
	sc, err := grpc.NewClient("passthrough:///"+strangerAddr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(sc).Check(ctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("a primary under an unknown root was accepted")
	}

	if _, err := xdsTLS(filepath.Join(t.TempDir(), "missing.pem"), "x"); err == nil {
		t.Fatal("a missing --xds-root-cert was accepted")
	}
	junk := filepath.Join(t.TempDir(), "junk.pem")
	os.WriteFile(junk, []byte("not a certificate"), 0o644)
	if _, err := xdsTLS(junk, "x"); err == nil {
		t.Fatal("an --xds-root-cert without a certificate was accepted")
	}
}
