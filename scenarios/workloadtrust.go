package scenarios

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/isthmus-mesh/isthmus/trust"
)

// workloadTrust is what a workload trusts: its own domain's roots from its CA and every
// peer domain's bundle from its cluster's bundle store, one bundle per domain. It writes
// the SPIFFE bundle map that the probes' grpc-go file_watcher provider reads
// (spiffe_trust_bundle_map_file) and verifies the callers of the echo server against the
// same bundles, so a federated domain's bundle reaching the store reaches the running
// workload without a restart — and leaves it the same way.
type workloadTrust struct {
	peers  *trust.BundleSet
	writer *trust.BundleMapWriter
}

func newWorkloadTrust(dir string) *workloadTrust {
	peers := trust.NewBundleSet()
	return &workloadTrust{peers: peers, writer: &trust.BundleMapWriter{Path: trust.BundleMapPath(dir), Peers: peers}}
}

// onIssue takes the roots of a new certificate (BundleMapWriter.SetIssued).
func (t *workloadTrust) onIssue(log func(msg string, args ...any)) func(trust.Issued) {
	return func(in trust.Issued) {
		if _, err := t.writer.SetIssued(in); err != nil {
			log("bundle map not written", "err", err)
		}
	}
}

// watch keeps the peer bundles equal to the cluster's bundle store until ctx ends.
func (w *workload) watchBundles(ctx context.Context) error {
	return trust.WatchBundleStore(ctx, w.cfg.Client, SystemNamespace, w.trust.peers,
		func() {
			if err := w.trust.writer.Update(); err != nil {
				w.cfg.Log.Warn("bundle map not written", "err", err)
			} else {
				w.cfg.Log.Info("trust bundles changed", "domains", fmt.Sprint(w.trust.peers.Domains()))
			}
		},
		func(err error) { w.cfg.Log.Warn("bundle store refused; the bundles in force stay", "err", err) })
}

// ready reports whether the bundles are written (after the first certificate).
func (t *workloadTrust) ready() bool { return t.writer.Bundles() != nil }

// verifyCaller checks a caller's chain against the bundle of the caller's own trust
// domain (crypto/tls's VerifyPeerCertificate).
func (t *workloadTrust) verifyCaller(raw [][]byte, _ [][]*x509.Certificate) error {
	set := t.writer.Bundles()
	if set == nil {
		return errors.New("scenarios: workload: no trust bundles yet")
	}
	_, err := set.VerifyPeer(raw)
	return err
}

// waitTrust waits until the first certificate and the bundle map are on disk.
func (w *workload) waitTrust(ctx context.Context) bool {
	for w.agent.Current() == nil || !w.trust.ready() {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
	return true
}
