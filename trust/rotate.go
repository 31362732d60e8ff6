package trust

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// CAStore is where one cluster's plug-in CA lives, which a rotation rewrites.
type CAStore interface {
	// Cluster is the cluster whose CA this is (it names the new intermediate).
	Cluster() mesh.ClusterID
	// Load returns the four plug-in CA files as they are now (see PluggedFiles); a store
	// that does not hold a valid CA is an error, so a rotation never starts from one.
	Load(ctx context.Context) (map[string][]byte, error)
	// Save writes files, replacing those named and leaving the others. A reader (the
	// primary's ReloadDir) may look at any moment, so each file must change atomically
	// and the key before the certificate it belongs to.
	Save(ctx context.Context, files map[string][]byte) error
}

// DirStore is a plug-in CA directory (`isthmus primary --ca-dir`).
type DirStore struct {
	ID  mesh.ClusterID
	Dir string
}

// Cluster implements CAStore.
func (d DirStore) Cluster() mesh.ClusterID { return d.ID }

// Load implements CAStore.
func (d DirStore) Load(context.Context) (map[string][]byte, error) {
	a, err := LoadDir(d.Dir)
	if err != nil {
		return nil, err
	}
	return a.PluggedFiles()
}

// Save implements CAStore: each file is replaced atomically, the key first, root-cert.pem
// last, so a reader never sees a certificate without its key.
func (d DirStore) Save(_ context.Context, files map[string][]byte) error {
	for _, name := range []string{CAKeyFile, CACertFile, CertChainFile, RootCertFile} {
		if data, ok := files[name]; ok {
			if err := writeAtomic(filepath.Join(d.Dir, name), data); err != nil {
				return err
			}
		}
	}
	return nil
}

// Rotation phases, in order.
const (
	// PhasePublish adds the new root to every CA's trust anchors; workloads pick it up at
	// their next renewal. Held for RotationConfig.Publish.
	PhasePublish = "publish"
	// PhaseReissue replaces every intermediate with one from the new root, keeping both
	// roots as anchors; leaves renew under the new chain. Held for RotationConfig.Reissue.
	PhaseReissue = "reissue"
	// PhaseRetire drops the old root from the anchors.
	PhaseRetire = "retire"
	// PhaseDone: the rotation is complete.
	PhaseDone = "done"
)

var phases = []string{PhasePublish, PhaseReissue, PhaseRetire, PhaseDone}

// RotationState is what a rotation records after every step, so that an interrupted one
// resumes where it stopped. It holds the new root's key: keep the file private (0600).
type RotationState struct {
	Phase string `json:"phase"`
	// PhaseReady is when every CA first served the current phase; its hold counts from
	// here. Zero until then.
	PhaseReady time.Time `json:"phaseReady,omitzero"`
	NewRoot    string    `json:"newRoot"`    // PEM
	NewRootKey string    `json:"newRootKey"` // PEM, PKCS#8
	// OldRoots are the fingerprints of the roots being retired.
	OldRoots []string  `json:"oldRoots"`
	Started  time.Time `json:"started"`
}

// RotationConfig configures Rotate.
type RotationConfig struct {
	// Stores are every cluster's CA; required.
	Stores []CAStore
	// Status reports what a cluster's CA serves (its /debug/trustz); required. Each phase
	// moves on only once every CA serves what the phase wrote.
	Status func(ctx context.Context, cluster mesh.ClusterID) (TrustStatus, error)
	// StateFile records progress; required.
	StateFile string
	// Publish is how long the new root is published before intermediates are reissued:
	// at least the longest time a workload goes without renewing (half a leaf's life),
	// plus any bundle refresh hint of federated peers. Reissue is how long leaves get to
	// renew under the new chain before the old root is retired.
	Publish, Reissue time.Duration
	// CheckTimeout bounds the wait for every CA to serve a phase; default 2 minutes.
	CheckTimeout time.Duration
	// Progress receives one line per step; nil discards.
	Progress func(string)
	// Peers and PeerRoots extend the rotation across trust domains (see waitPeers): the
	// primaries of the domains federated with this one, and what each holds in force for
	// this domain (its trustz). Optional.
	Peers     []string
	PeerRoots func(ctx context.Context, peer string, td mesh.TrustDomain) ([]string, error)
}

// Rotate replaces the mesh's root without downtime: publish the new root next to the old
// one, reissue the intermediates from it, then retire the old root. Each phase is applied
// idempotently to every store, confirmed on every CA, and held for its period before the
// next; progress goes to the state file, and calling Rotate again after an interruption
// resumes there. It returns nil once the rotation is done.
func Rotate(ctx context.Context, cfg RotationConfig) error {
	if len(cfg.Stores) == 0 || cfg.Status == nil || cfg.StateFile == "" {
		return errors.New("trust: rotate: Stores, Status and StateFile are required")
	}
	if cfg.CheckTimeout == 0 {
		cfg.CheckTimeout = 2 * time.Minute
	}
	if cfg.Progress == nil {
		cfg.Progress = func(string) {}
	}
	st, err := loadOrStartRotation(ctx, cfg)
	if err != nil {
		return err
	}
	newRoot, err := ParsePlugged(map[string][]byte{CACertFile: []byte(st.NewRoot), CAKeyFile: []byte(st.NewRootKey), RootCertFile: []byte(st.NewRoot)})
	if err != nil {
		return fmt.Errorf("trust: rotate: the state's new root: %w", err)
	}
	newFP := Fingerprint(newRoot.Cert.Raw)
	for st.Phase != PhaseDone {
		for _, s := range cfg.Stores {
			if err := applyPhase(ctx, st.Phase, s, newRoot); err != nil {
				return fmt.Errorf("trust: rotate: %s %s: %w", st.Phase, s.Cluster(), err)
			}
		}
		cfg.Progress(fmt.Sprintf("%s: written to %d CA(s); waiting for each to serve it", st.Phase, len(cfg.Stores)))
		if err := waitServed(ctx, cfg, st, newFP); err != nil {
			return err
		}
		if err := waitPeers(ctx, cfg, st, newRoot.TrustDomain, newFP); err != nil {
			return err
		}
		if st.PhaseReady.IsZero() {
			st.PhaseReady = time.Now()
			if err := saveRotation(cfg.StateFile, st); err != nil {
				return err
			}
		}
		hold := map[string]time.Duration{PhasePublish: cfg.Publish, PhaseReissue: cfg.Reissue}[st.Phase]
		if wait := time.Until(st.PhaseReady.Add(hold)); wait > 0 {
			cfg.Progress(fmt.Sprintf("%s: every CA serves it; holding %s so workloads renew", st.Phase, wait.Round(time.Millisecond)))
			select {
			case <-ctx.Done():
				return fmt.Errorf("trust: rotate: interrupted in %s (resume with the same state file): %w", st.Phase, ctx.Err())
			case <-time.After(wait):
			}
		}
		st.Phase, st.PhaseReady = phases[slices.Index(phases, st.Phase)+1], time.Time{}
		if err := saveRotation(cfg.StateFile, st); err != nil {
			return err
		}
	}
	cfg.Progress("done: every CA signs under the new root, which is the only anchor")
	return nil
}

// loadOrStartRotation reads the state file, or starts a rotation: a new root for the
// stores' trust domain, phase publish.
func loadOrStartRotation(ctx context.Context, cfg RotationConfig) (*RotationState, error) {
	data, err := os.ReadFile(cfg.StateFile)
	if err == nil {
		var st RotationState
		if err := json.Unmarshal(data, &st); err != nil {
			return nil, fmt.Errorf("trust: rotate: state %s: %w", cfg.StateFile, err)
		}
		if !slices.Contains(phases, st.Phase) {
			return nil, fmt.Errorf("trust: rotate: state %s: unknown phase %q", cfg.StateFile, st.Phase)
		}
		cfg.Progress(fmt.Sprintf("resuming the rotation started %s in phase %s", st.Started.Format(time.RFC3339), st.Phase))
		return &st, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	files, err := cfg.Stores[0].Load(ctx)
	if err != nil {
		return nil, err
	}
	cur, err := ParsePlugged(files)
	if err != nil {
		return nil, err
	}
	root, err := NewRoot(cur.TrustDomain, RootOptions{})
	if err != nil {
		return nil, err
	}
	kp, err := keyPEM(root.Key)
	if err != nil {
		return nil, err
	}
	st := &RotationState{Phase: PhasePublish, Started: time.Now(), NewRoot: string(root.RootPEM()), NewRootKey: string(kp)}
	for _, c := range cur.TrustAnchors() {
		st.OldRoots = append(st.OldRoots, Fingerprint(c.Raw))
	}
	cfg.Progress(fmt.Sprintf("new root %s for %s (retiring %d old root(s))", Fingerprint(root.Cert.Raw)[:16], cur.TrustDomain, len(st.OldRoots)))
	return st, saveRotation(cfg.StateFile, st)
}

func saveRotation(path string, st *RotationState) error {
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(path, data) // 0600: it holds the new root's key
}

// applyPhase rewrites one store for phase; applying it twice changes nothing more.
func applyPhase(ctx context.Context, phase string, s CAStore, newRoot *Authority) error {
	files, err := s.Load(ctx)
	if err != nil {
		return err
	}
	cur, err := ParsePlugged(files)
	if err != nil {
		return err
	}
	switch phase {
	case PhasePublish:
		// Anchors: the current root first (it still signs), then the new one.
		if !slices.ContainsFunc(cur.TrustAnchors(), newRoot.Cert.Equal) {
			cur.Anchors = append(slices.Clone(cur.TrustAnchors()), newRoot.Cert)
		}
	case PhaseReissue:
		if !cur.Root.Equal(newRoot.Cert) {
			old := cur.TrustAnchors()
			if cur, err = newRoot.NewIntermediate(IntermediateOptions{Cluster: s.Cluster()}); err != nil {
				return err
			}
			cur.Anchors = append([]*x509.Certificate{newRoot.Cert}, slices.DeleteFunc(slices.Clone(old), newRoot.Cert.Equal)...)
		}
	case PhaseRetire:
		if !cur.Root.Equal(newRoot.Cert) {
			return fmt.Errorf("the CA does not sign under the new root yet; the state file says %s, so the store was changed by hand", phase)
		}
		cur.Anchors = nil
	}
	out, err := cur.PluggedFiles()
	if err != nil {
		return err
	}
	return s.Save(ctx, out)
}

// waitServed waits until every CA reports what phase wrote.
func waitServed(ctx context.Context, cfg RotationConfig, st *RotationState, newFP string) error {
	want := func(ts TrustStatus) error {
		has := slices.Contains(ts.Anchors, newFP)
		switch st.Phase {
		case PhasePublish:
			if !has {
				return errors.New("does not hand out the new root yet")
			}
		case PhaseReissue:
			if ts.Root != newFP || !has {
				return errors.New("does not sign under the new root yet")
			}
		case PhaseRetire:
			if len(ts.Anchors) != 1 || !has {
				return fmt.Errorf("still hands out %d roots", len(ts.Anchors))
			}
		}
		return nil
	}
	deadline := time.Now().Add(cfg.CheckTimeout)
	for _, s := range cfg.Stores {
		for {
			ts, err := cfg.Status(ctx, s.Cluster())
			if err == nil {
				err = want(ts)
			}
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("trust: rotate: %s: the CA of %s %v after %s; is it reloading its CA (isthmus primary --ca-dir)?", st.Phase, s.Cluster(), err, cfg.CheckTimeout)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("trust: rotate: interrupted in %s (resume with the same state file): %w", st.Phase, ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}
