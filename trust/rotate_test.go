package trust_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"

	"github.com/isthmus-mesh/isthmus/internal/kubelocal/kubetest"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// rotCA is one cluster's CA during the rotation test: a plug-in directory, a CSR server
// reloading it, reachable over TLS.
type rotCA struct {
	id   mesh.ClusterID
	dir  string
	srv  *trust.Server
	addr string
}

func startRotCA(t *testing.T, ctx context.Context, root *trust.Authority, id mesh.ClusterID) *rotCA {
	t.Helper()
	inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: id})
	if err != nil {
		t.Fatal(err)
	}
	c := &rotCA{id: id, dir: t.TempDir()}
	if err := inter.WriteDir(c.dir); err != nil {
		t.Fatal(err)
	}
	if c.srv, err = trust.NewServer(trust.ServerConfig{Authority: inter, Clusters: trust.StaticClients{id: env.client}, LocalCluster: id,
		Metrics: prometheus.NewRegistry()}); err != nil {
		t.Fatal(err)
	}
	// The serving certificate stays from the old root: the CA's own TLS is not what
	// rotates here, and the agents trust the old root for it throughout.
	certs, key, err := inter.IssueServing([]string{"istiod.istio-system.svc"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tc, _ := tls.X509KeyPair(bytes.Join(certs, nil), pemKey(key))
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{tc}, ClientAuth: tls.RequestClientCert})))
	c.srv.Register(g)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	c.addr = l.Addr().String()
	go g.Serve(l)
	t.Cleanup(g.Stop)
	go trust.ReloadDir(ctx, c.srv, c.dir, 50*time.Millisecond, func(err error) { t.Logf("reload: %v", err) })
	return c
}

// rotWorkload is a workload whose agent renews every second: an mTLS server, and the
// certificate and roots its client side uses, re-read from the agent's files for every
// handshake as grpc-go's file_watcher does.
type rotWorkload struct {
	dir  string
	addr string

	mu sync.Mutex
	// good is the last certificate and key that matched; guarded by mu.
	good *tls.Certificate
}

// keyPair reads the certificate and key. Two files cannot change at once, so a read that
// straddles a renewal (old certificate, new key) falls back to the last pair that matched,
// as grpc-go's file_watcher keeps its last good certificate.
func (w *rotWorkload) keyPair() (*tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(filepath.Join(w.dir, trust.AgentCertFile), filepath.Join(w.dir, trust.AgentKeyFile))
	w.mu.Lock()
	defer w.mu.Unlock()
	if err == nil {
		w.good = &c
	} else if w.good != nil {
		return w.good, nil
	}
	return &c, err
}

func (w *rotWorkload) roots() (*x509.CertPool, error) {
	data, err := os.ReadFile(filepath.Join(w.dir, trust.AgentRootFile))
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, errors.New("no roots")
	}
	return pool, nil
}

func startRotWorkload(t *testing.T, ctx context.Context, ca *rotCA, sa string, caRoot *x509.Certificate) *rotWorkload {
	t.Helper()
	w := &rotWorkload{dir: t.TempDir()}
	pool := x509.NewCertPool()
	pool.AddCert(caRoot)
	conn, err := grpc.NewClient(ca.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	token := serviceAccountToken(t, "demo", sa, []string{trust.Audience}, nil)
	agent, err := trust.NewAgent(trust.AgentConfig{CA: pb.NewIstioCertificateServiceClient(conn), Token: func() (string, error) { return token, nil },
		Cluster: ca.id, Dir: w.dir, TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	go agent.Run(ctx)
	kubetest.Eventually(t, 10*time.Second, "first certificate", func() error {
		if agent.Current() == nil {
			return errors.New("none yet")
		}
		return nil
	})
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	w.addr = l.Addr().String()
	tl := tls.NewListener(l, &tls.Config{
		ClientAuth: tls.RequireAndVerifyClientCert,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			pair, err := w.keyPair()
			if err != nil {
				return nil, err
			}
			roots, err := w.roots()
			if err != nil {
				return nil, err
			}
			return &tls.Config{Certificates: []tls.Certificate{*pair}, ClientCAs: roots, ClientAuth: tls.RequireAndVerifyClientCert}, nil
		},
	})
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); c.(*tls.Conn).Handshake(); c.Write([]byte("ok")) }()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return w
}

// call makes one new mTLS connection from w to peer and reads its answer.
func (w *rotWorkload) call(peer *rotWorkload) error {
	pair, err := w.keyPair()
	if err != nil {
		return err
	}
	roots, err := w.roots()
	if err != nil {
		return err
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", peer.addr, &tls.Config{Certificates: []tls.Certificate{*pair}, RootCAs: roots,
		InsecureSkipVerify: true, // the name is a SPIFFE ID, checked by VerifyPeerCertificate below against roots
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			certs := make([]*x509.Certificate, len(raw))
			for i, r := range raw {
				if certs[i], err = x509.ParseCertificate(r); err != nil {
					return err
				}
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			return err
		}})
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil {
		return err
	}
	return nil
}

// TestRootRotationWithoutDowntime rotates the root under two CAs while a workload of each
// makes a new mTLS connection to the other every 20 ms; the rotation is interrupted once
// and resumed. Not one handshake may fail, and at the end both workloads trust the new
// root alone and hold leaves under it.
func TestRootRotationWithoutDowntime(t *testing.T) {
	needEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	oldRoot, err := trust.NewRoot("cluster.local", trust.RootOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cas := []*rotCA{startRotCA(t, ctx, oldRoot, "rot-1"), startRotCA(t, ctx, oldRoot, "rot-2")}
	a := startRotWorkload(t, ctx, cas[0], "rot-a", oldRoot.Cert)
	b := startRotWorkload(t, ctx, cas[1], "rot-b", oldRoot.Cert)

	var calls, failed atomic.Int64
	var firstErr sync.Once
	stopCalls := make(chan struct{})
	callsDone := make(chan struct{})
	go func() {
		defer close(callsDone)
		for {
			select {
			case <-stopCalls:
				return
			case <-time.After(20 * time.Millisecond):
			}
			for _, pair := range [][2]*rotWorkload{{a, b}, {b, a}} {
				calls.Add(1)
				if err := pair[0].call(pair[1]); err != nil {
					failed.Add(1)
					firstErr.Do(func() { t.Errorf("handshake failed during the rotation: %v", err) })
				}
			}
		}
	}()

	cfg := trust.RotationConfig{
		Stores:    []trust.CAStore{trust.DirStore{ID: "rot-1", Dir: cas[0].dir}, trust.DirStore{ID: "rot-2", Dir: cas[1].dir}},
		StateFile: filepath.Join(t.TempDir(), "rotation.json"),
		Status: func(_ context.Context, id mesh.ClusterID) (trust.TrustStatus, error) {
			for _, c := range cas {
				if c.id == id {
					return c.srv.Status(), nil
				}
			}
			return trust.TrustStatus{}, errors.New("unknown cluster")
		},
		// Leaves live 2 s and renew at half-life: 4 s covers every workload's renewal with room for a loaded machine.
		Publish: 4 * time.Second, Reissue: 4 * time.Second,
		Progress: func(s string) { t.Log(s) },
	}
	// Interrupted during the publish hold, then resumed from the state file.
	ictx, icancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	if err := trust.Rotate(ictx, cfg); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("interrupted rotation: %v", err)
	}
	icancel()
	if err := trust.Rotate(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	// Leaves issued before retirement still carry both anchors; calls go on until both
	// workloads have renewed into trusting the new root alone.
	kubetest.Eventually(t, 10*time.Second, "workloads trusting the new root alone", func() error {
		for _, w := range []*rotWorkload{a, b} {
			roots, _ := os.ReadFile(filepath.Join(w.dir, trust.AgentRootFile))
			if n := bytes.Count(roots, []byte("BEGIN CERTIFICATE")); n != 1 {
				return fmt.Errorf("a workload trusts %d roots", n)
			}
		}
		return nil
	})
	close(stopCalls)
	<-callsDone
	t.Logf("%d connections during the rotation, %d failed", calls.Load(), failed.Load())
	if calls.Load() < 100 {
		t.Fatalf("only %d connections: the test did not exercise the rotation", calls.Load())
	}

	data, _ := os.ReadFile(cfg.StateFile)
	var state trust.RotationState
	if err := json.Unmarshal(data, &state); err != nil || state.Phase != trust.PhaseDone {
		t.Fatalf("state %q after the rotation (%v)", state.Phase, err)
	}
	for _, w := range []*rotWorkload{a, b} {
		roots, _ := os.ReadFile(filepath.Join(w.dir, trust.AgentRootFile))
		blk, rest := pem.Decode(roots)
		if blk == nil || len(bytes.TrimSpace(rest)) != 0 {
			t.Fatalf("workload trusts %d+ roots after the rotation; want the new one alone", 2)
		}
		if bytes.Equal(blk.Bytes, oldRoot.Cert.Raw) || string(pem.EncodeToMemory(blk)) != state.NewRoot {
			t.Fatal("the workload's root is not the new root")
		}
		pair, err := w.keyPair()
		if err != nil {
			t.Fatal(err)
		}
		leaf, _ := x509.ParseCertificate(pair.Certificate[0])
		inter, _ := x509.ParseCertificate(pair.Certificate[1])
		if err := leaf.CheckSignatureFrom(inter); err != nil || inter.CheckSignatureFrom(oldRoot.Cert) == nil {
			t.Fatal("the workload's leaf is not under a new-root intermediate")
		}
	}
}
