package federation

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// PeerBundleSink receives the trust bundles of the live peerings (trust domain → PEM
// roots), the complete set on every change, so the mesh's workloads can verify the
// peers' identities. It is called with the Endpoint's lock held and must not block.
type PeerBundleSink interface {
	SetPeerBundles(map[mesh.TrustDomain]string)
}

// StoreBundles is a PeerBundleSink that writes the peers' bundles into the trust bundle
// store (the ConfigMap isthmus-trust-bundles, which agents and SDS follow) beside what
// `isthmus trust` manages: it adds and updates the peers' domains and removes only the
// domains it added itself in this process (a peering deleted while the primary was down
// leaves its bundle until `isthmus trust bundle remove`).
type StoreBundles struct {
	store trust.BundleStore
	log   *slog.Logger
	kick  chan struct{}

	mu sync.Mutex
	// want is the wished set, applied the set written; guarded by mu.
	want, applied map[mesh.TrustDomain]string
	err           error
}

// NewStoreBundles returns a sink writing to store.
func NewStoreBundles(store trust.BundleStore, log *slog.Logger) *StoreBundles {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &StoreBundles{store: store, log: log, kick: make(chan struct{}, 1), want: map[mesh.TrustDomain]string{}, applied: map[mesh.TrustDomain]string{}}
}

// SetPeerBundles implements PeerBundleSink.
func (s *StoreBundles) SetPeerBundles(b map[mesh.TrustDomain]string) {
	s.mu.Lock()
	s.want = maps.Clone(b)
	s.mu.Unlock()
	poke(s.kick)
}

// Err is the last write's error, nil when the store holds the wished set.
func (s *StoreBundles) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Run applies the wished set until ctx ends, retrying every 2 s after an error.
func (s *StoreBundles) Run(ctx context.Context) error {
	retry := time.NewTicker(2 * time.Second)
	defer retry.Stop()
	for {
		s.mu.Lock()
		want, applied, failed := maps.Clone(s.want), maps.Clone(s.applied), s.err != nil
		s.mu.Unlock()
		if failed || !maps.Equal(want, applied) {
			err := s.apply(ctx, want, applied)
			s.mu.Lock()
			s.err = err
			if err == nil {
				s.applied = want
			}
			s.mu.Unlock()
			if err != nil {
				s.log.Warn("peer bundles not written to the bundle store; retrying", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-retry.C:
		}
	}
}

func (s *StoreBundles) apply(ctx context.Context, want, applied map[mesh.TrustDomain]string) error {
	parsed := map[mesh.TrustDomain]*spiffebundle.Bundle{}
	for td, pem := range want {
		b, err := trust.ParsePEMBundle(td, []byte(pem))
		if err != nil {
			return fmt.Errorf("federation: bundle of peer %s: %w", td, err)
		}
		if err := trust.CheckBundle(td, b, time.Now()); err != nil {
			return fmt.Errorf("federation: bundle of peer %s: %w", td, err)
		}
		parsed[td] = b
	}
	_, err := s.store.Update(ctx, func(set *trust.BundleSet) error {
		for td := range applied {
			if _, ok := want[td]; !ok {
				set.Remove(td)
			}
		}
		for _, b := range parsed {
			if err := set.Set(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("federation: write peer bundles: %w", err)
	}
	return nil
}
