package trust

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// waitPeers waits until every federated peer primary holds what the phase published for
// td: the new root among the domain's roots (publish, reissue), or the new root alone
// (retire). The publish hold then counts from when every other domain has the new root —
// publish-ahead across the federation, stronger than counting refresh hints (the SPIFFE
// rule of 3–5 hints), and the hold still covers the peers' workloads picking the bundle up.
func waitPeers(ctx context.Context, cfg RotationConfig, st *RotationState, td mesh.TrustDomain, newFP string) error {
	if len(cfg.Peers) == 0 {
		return nil
	}
	if cfg.PeerRoots == nil {
		return errors.New("trust: rotate: Peers need PeerRoots")
	}
	want := func(roots []string) error {
		has := slices.Contains(roots, newFP)
		switch {
		case !has:
			return errors.New("does not hold the new root yet")
		case st.Phase == PhaseRetire && len(roots) != 1:
			return fmt.Errorf("still holds %d roots", len(roots))
		}
		return nil
	}
	deadline := time.Now().Add(cfg.CheckTimeout)
	for _, p := range cfg.Peers {
		for {
			roots, err := cfg.PeerRoots(ctx, p, td)
			if err == nil {
				err = want(roots)
			}
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("trust: rotate: %s: peer %s %v for %s after %s; is it federated with %s (isthmus trust status)?", st.Phase, p, err, td, cfg.CheckTimeout, td)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("trust: rotate: interrupted in %s (resume with the same state file): %w", st.Phase, ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	cfg.Progress(fmt.Sprintf("%s: every federated peer (%d) holds %s's new bundle", st.Phase, len(cfg.Peers), td))
	return nil
}
