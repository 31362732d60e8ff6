package federation

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// dial opens a client connection to a peer's federation endpoint with tlsConf.
func dial(addr string, tlsConf *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConf)),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(jsonCodec{})),
		// A peer that vanishes without closing (a partition) breaks the stream within
		// about 4 s, beside the gossip pool's own suspicion.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 2 * time.Second, Timeout: 2 * time.Second}))
	if err != nil {
		return nil, fmt.Errorf("federation: dial %s: %w", addr, err)
	}
	return conn, nil
}

// verifyingTLS returns a client TLS config that accepts only a certificate chaining to
// roots with a SPIFFE ID in td (server names are not checked: SPIFFE authenticates by ID).
func verifyingTLS(roots []*x509.Certificate, td mesh.TrustDomain, cert func() (*tls.Certificate, error)) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, // verified below, by SPIFFE ID
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error { return verifySVID(raw, roots, td) }}
	if cert != nil {
		c.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert() }
	}
	return c
}

// CreateToken makes a PENDING peering called peer and returns its token. The first token
// of a mesh that is in no federation yet founds one (a fresh ID and secret).
func (e *Endpoint) CreateToken(peer string) (string, error) {
	if _, err := ParsePeerName(peer); err != nil {
		return "", fmt.Errorf("federation: token: %w", err)
	}
	secret, err := NewSecret()
	if err != nil {
		return "", err
	}
	id, err := NewPeeringID()
	if err != nil {
		return "", err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if i := e.findLocked(peer); i >= 0 {
		return "", fmt.Errorf("federation: peering %q exists (%s); delete it first", peer, e.state.Peerings[i].State)
	}
	old := cloneState(e.state)
	if e.state.FederationID == "" {
		fid, err := NewPeeringID()
		if err != nil {
			return "", err
		}
		fsecret, err := NewSecret()
		if err != nil {
			return "", err
		}
		e.state.FederationID, e.state.FederationSecret = fid, fsecret
	}
	now := e.cfg.Now()
	tok := &Token{ID: id, Peer: peer, Mesh: e.cfg.Mesh, TrustDomain: e.cfg.TrustDomain, Addresses: e.cfg.Advertise,
		BundleFingerprint: BundleFingerprint(e.cfg.Roots()), Secret: secret, ExpiresAt: now.Add(e.cfg.TokenTTL).UTC()}
	s, err := tok.Encode()
	if err != nil {
		return "", err
	}
	e.state.Peerings = append(e.state.Peerings, Peering{Name: peer, ID: id, Role: RoleAcceptor, State: StatePending,
		SecretHash: SecretHash(secret), ExpiresAt: tok.ExpiresAt, CreatedAt: now.UTC()})
	if err := e.saveLocked(); err != nil {
		e.state = old
		return "", err
	}
	if e.pool == nil {
		if err := e.startPoolLocked(); err != nil {
			// Nothing is kept of a token that is not handed out: a PENDING peering left
			// behind would refuse the next CreateToken for this peer.
			e.state = old
			if serr := e.saveLocked(); serr != nil {
				e.log.Error("save federation state", "err", serr)
			}
			return "", fmt.Errorf("federation: token: gossip did not start (nothing recorded): %w", err)
		}
	}
	return s, nil
}

func cloneState(s *StoredState) *StoredState {
	c := *s
	c.Peerings = slices.Clone(s.Peerings)
	return &c
}

// Establish uses a token from an accepting mesh: it checks the acceptor's bundle against
// the token's fingerprint, proves the secret over TLS verified with that bundle, records
// the peering as ESTABLISHING under name (default: the acceptor's mesh ID) and joins the
// federation's gossip pool. Nothing is recorded when any step fails.
//
// A token refused here (or by the acceptor) is counted in
// isthmus_federation_token_refused_total{reason}.
func (e *Endpoint) Establish(ctx context.Context, token, name string) (Peering, error) {
	p, err := e.establishToken(ctx, token, name)
	if err != nil {
		var tr *tokenRefusal
		switch {
		case errors.As(err, &tr):
			e.metrics.tokenRefused.WithLabelValues(tr.reason).Inc()
		case status.Code(err) == codes.PermissionDenied:
			e.metrics.tokenRefused.WithLabelValues("peer").Inc()
		}
	}
	return p, err
}

// tokenRefusal is a token this mesh refused as the dialer, with the metric's reason.
type tokenRefusal struct {
	reason string
	err    error
}

func (r *tokenRefusal) Error() string { return r.err.Error() }
func (r *tokenRefusal) Unwrap() error { return r.err }

func refuseToken(reason string, err error) error { return &tokenRefusal{reason: reason, err: err} }

func (e *Endpoint) establishToken(ctx context.Context, token, name string) (Peering, error) {
	tok, err := ParseToken(token)
	if err != nil {
		return Peering{}, refuseToken("malformed", err)
	}
	if name == "" {
		name = string(tok.Mesh)
	}
	if _, err := ParsePeerName(name); err != nil {
		return Peering{}, fmt.Errorf("federation: establish: %w (choose another name)", err)
	}
	if tok.Mesh == e.cfg.Mesh || tok.TrustDomain == e.cfg.TrustDomain {
		return Peering{}, refuseToken("self", fmt.Errorf("federation: establish: the token is of mesh %s (trust domain %s), which is this mesh's own ID or trust domain", tok.Mesh, tok.TrustDomain))
	}
	if now := e.cfg.Now(); now.After(tok.ExpiresAt) {
		return Peering{}, refuseToken("expired", fmt.Errorf("federation: establish: token expired at %s", tok.ExpiresAt.Format("2006-01-02T15:04:05Z07:00")))
	}
	e.mu.Lock()
	// The same token run again (a retried command whose first answer was lost, or that
	// reported a late failure after the peering was recorded) gets the peering it made.
	if i := e.findLocked(name); i >= 0 {
		if p := e.state.Peerings[i]; p.ID == tok.ID && p.Role == RoleDialer && p.State != StateTerminated {
			e.mu.Unlock()
			p.PeerRootsPEM = ""
			return p, nil
		}
	}
	err = e.checkNewPeerLocked(name, tok.Mesh, tok.TrustDomain)
	ourFed, busy := e.state.FederationID, e.liveNonPendingLocked() > 0
	e.mu.Unlock()
	if err != nil {
		return Peering{}, refuseToken("conflict", err)
	}
	var lastErr error
	for _, addr := range tok.Addresses {
		p, err := e.establishAt(ctx, addr, tok, name, ourFed, busy)
		if err == nil {
			return p, nil
		}
		if status.Code(err) == codes.PermissionDenied || errors.Is(err, errRefusedLocally) {
			return Peering{}, err // the acceptor or we said no: another address will not change that
		}
		lastErr = err
	}
	return Peering{}, fmt.Errorf("federation: establish: no endpoint of %s answered: %w", tok.Mesh, lastErr)
}

var errRefusedLocally = errors.New("refused")

// establishAt runs the handshake against one address of the token.
func (e *Endpoint) establishAt(ctx context.Context, addr string, tok *Token, name, ourFed string, busy bool) (Peering, error) {
	// 1. The bundle, over unverified TLS: its fingerprint authenticates it.
	conn, err := dial(addr, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}) // authenticity by fingerprint, next
	if err != nil {
		return Peering{}, err
	}
	var br bundleResponse
	err = conn.Invoke(ctx, methodBundle, &bundleRequest{}, &br)
	conn.Close()
	if err != nil {
		return Peering{}, fmt.Errorf("federation: fetch bundle from %s: %w", addr, err)
	}
	roots, err := parseRoots(br.RootsPEM)
	if err != nil {
		return Peering{}, refuseToken("bundle", fmt.Errorf("federation: %s: %w: %w", addr, errRefusedLocally, err))
	}
	if fp := BundleFingerprint(roots); fp != tok.BundleFingerprint {
		return Peering{}, refuseToken("bundle", fmt.Errorf("federation: %s: %w: its bundle's fingerprint %s is not the token's %s", addr, errRefusedLocally, fp, tok.BundleFingerprint))
	}
	if br.Mesh != tok.Mesh || br.TrustDomain != tok.TrustDomain {
		return Peering{}, refuseToken("identity", fmt.Errorf("federation: %s: %w: it is mesh %s (trust domain %s), the token says %s (%s)", addr, errRefusedLocally, br.Mesh, br.TrustDomain, tok.Mesh, tok.TrustDomain))
	}
	if busy && ourFed != br.FederationID {
		return Peering{}, refuseToken("federation", fmt.Errorf("federation: %w: this mesh is in federation %s with live peerings, the token's mesh in federation %s; delete this mesh's peerings first", errRefusedLocally, ourFed, br.FederationID))
	}
	// 2. The secret, over TLS verified with that bundle, with our certificate.
	tlsConf := verifyingTLS(roots, tok.TrustDomain, e.cfg.Certificate)
	verify := tlsConf.VerifyPeerCertificate
	var certMu sync.Mutex
	var certErr error // set by the handshake: the endpoint's certificate is not the bundle's or domain's
	tlsConf.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		err := verify(raw, chains)
		certMu.Lock()
		certErr = err
		certMu.Unlock()
		return err
	}
	conn, err = dial(addr, tlsConf)
	if err != nil {
		return Peering{}, err
	}
	defer conn.Close()
	var resp establishResponse
	req := &establishRequest{PeeringID: tok.ID, Secret: tok.Secret, Mesh: e.cfg.Mesh, TrustDomain: e.cfg.TrustDomain,
		Addresses: e.cfg.Advertise, RootsPEM: rootsPEM(e.cfg.Roots()), GossipAddr: e.gossipAddr()}
	if err := conn.Invoke(ctx, methodEstablish, req, &resp); err != nil {
		certMu.Lock()
		cerr := certErr
		certMu.Unlock()
		if cerr != nil {
			return Peering{}, refuseToken("identity", fmt.Errorf("federation: establish with %s: the endpoint's certificate: %w", addr, cerr))
		}
		return Peering{}, fmt.Errorf("federation: establish with %s: %w", addr, err)
	}
	if resp.FederationID != br.FederationID || len(resp.FederationSecret) < 16 {
		return Peering{}, refuseToken("peer", fmt.Errorf("federation: establish with %s: bad answer (federation %q)", addr, resp.FederationID))
	}
	// 3. Record it and join the pool.
	e.mu.Lock()
	if err := e.checkNewPeerLocked(name, tok.Mesh, tok.TrustDomain); err != nil {
		e.mu.Unlock()
		return Peering{}, refuseToken("conflict", err)
	}
	old := cloneState(e.state)
	var oldPool *Pool
	if e.state.FederationID != resp.FederationID {
		e.state.FederationID, e.state.FederationSecret = resp.FederationID, resp.FederationSecret
		oldPool, e.pool = e.pool, nil
	}
	p := Peering{Name: name, ID: tok.ID, Role: RoleDialer, State: StateEstablishing, PeerMesh: tok.Mesh, PeerTrustDomain: tok.TrustDomain,
		PeerAddresses: tok.Addresses, PeerGossip: resp.GossipAddrs, PeerRootsPEM: br.RootsPEM, CreatedAt: e.cfg.Now().UTC()}
	e.state.Peerings = append(e.state.Peerings, p)
	if err := e.saveLocked(); err != nil {
		e.state, e.pool = old, oldPool
		e.mu.Unlock()
		return Peering{}, err
	}
	e.mu.Unlock()
	if oldPool != nil {
		oldPool.Close()
	}
	e.mu.Lock()
	if e.pool == nil {
		if err := e.startPoolLocked(); err != nil { // joins resp.GossipAddrs, now in the state
			// A peering without gossip would stay ESTABLISHING and refuse every new
			// token for this peer ("delete it first"): take it back, with the federation
			// it switched to. The acceptor's side stays ESTABLISHING, so the same token
			// run again is answered again (its replay) and completes.
			e.unrecordLocked(name, tok.ID, old, resp.FederationID)
			e.mu.Unlock()
			e.kick() // reconcile restarts the pool of the federation kept
			return Peering{}, fmt.Errorf("federation: establish: gossip did not start (nothing recorded; run it again): %w", err)
		}
	} else {
		pool := e.pool
		go func() { _ = pool.Join(resp.GossipAddrs) }()
	}
	e.mu.Unlock()
	e.kick()
	p.PeerRootsPEM = ""
	return p, nil
}

// unrecordLocked undoes the record of dialer peering name/id made by establishAt, whose
// state before was old: the peering goes, and the federation it switched to (fid) goes
// back to old's unless something else changed it meanwhile.
func (e *Endpoint) unrecordLocked(name, id string, old *StoredState, fid string) {
	e.state.Peerings = slices.DeleteFunc(e.state.Peerings, func(q Peering) bool {
		return q.Name == name && q.ID == id && q.Role == RoleDialer
	})
	if e.state.FederationID == fid && old.FederationID != fid {
		e.state.FederationID, e.state.FederationSecret = old.FederationID, old.FederationSecret
	}
	if err := e.saveLocked(); err != nil {
		e.log.Error("save federation state", "err", err)
	}
}

// checkNewPeerLocked refuses a second live peering of the same name, mesh or domain.
func (e *Endpoint) checkNewPeerLocked(name string, m mesh.MeshID, td mesh.TrustDomain) error {
	for _, p := range e.state.Peerings {
		if p.State == StateTerminated {
			continue
		}
		switch {
		case p.Name == name:
			return fmt.Errorf("federation: %w: peering %q exists (%s); delete it first", errRefusedLocally, name, p.State)
		case p.PeerMesh == m:
			return fmt.Errorf("federation: %w: mesh %s is already peered as %q", errRefusedLocally, m, p.Name)
		case p.PeerTrustDomain == td:
			return fmt.Errorf("federation: %w: trust domain %s is already peered as %q", errRefusedLocally, td, p.Name)
		}
	}
	return nil
}

func (e *Endpoint) liveNonPendingLocked() int {
	n := 0
	for _, p := range e.state.Peerings {
		if p.State != StateTerminated && p.State != StatePending {
			n++
		}
	}
	return n
}

// bundle answers who this endpoint is (no authentication: the caller checks the
// fingerprint).
func (e *Endpoint) bundle(context.Context) (*bundleResponse, error) {
	e.mu.Lock()
	fid := e.state.FederationID
	e.mu.Unlock()
	return &bundleResponse{Mesh: e.cfg.Mesh, TrustDomain: e.cfg.TrustDomain, RootsPEM: rootsPEM(e.cfg.Roots()), FederationID: fid}, nil
}

// establish is the acceptor's side of the handshake: the secret once, before expiry, a
// dialer of another mesh and domain that proves its certificate chains to the bundle it
// hands over.
func (e *Endpoint) establish(ctx context.Context, req *establishRequest) (*establishResponse, error) {
	deny := func(reason, format string, args ...any) error {
		e.metrics.establishRefused.WithLabelValues(reason).Inc()
		msg := fmt.Sprintf(format, args...)
		e.log.Warn("establish refused", "reason", reason, "detail", msg)
		return status.Error(codes.PermissionDenied, "federation: establish refused: "+msg)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	i := slices.IndexFunc(e.state.Peerings, func(p Peering) bool { return p.ID == req.PeeringID && p.Role == RoleAcceptor })
	if i < 0 {
		return nil, deny("unknown", "no token with peering ID %q", req.PeeringID)
	}
	p := &e.state.Peerings[i]
	want, _ := hex.DecodeString(p.SecretHash)
	got, _ := hex.DecodeString(SecretHash(req.Secret))
	secretOK := len(want) > 0 && subtle.ConstantTimeCompare(want, got) == 1
	// The same dialer asking again while ESTABLISHING lost our first answer: it gets the
	// same answer again (nothing is changed), so a dropped reply never strands a peering.
	replay := p.State == StateEstablishing && secretOK && req.Mesh == p.PeerMesh && req.TrustDomain == p.PeerTrustDomain && req.RootsPEM == p.PeerRootsPEM
	switch {
	case p.State == StateTerminated && strings.Contains(p.Reason, "expired"):
		return nil, deny("expired", "token of peering %q %s", p.Name, p.Reason)
	case p.State == StateTerminated:
		return nil, deny("revoked", "peering %q was terminated (%s); ask for a new token", p.Name, p.Reason)
	case p.State != StatePending && !replay:
		return nil, deny("used", "token of peering %q already used (peering is %s)", p.Name, p.State)
	case !secretOK:
		return nil, deny("secret", "wrong secret for peering %q", p.Name)
	}
	if e.cfg.Now().After(p.ExpiresAt) {
		return nil, deny("expired", "token of peering %q expired at %s", p.Name, p.ExpiresAt.Format("2006-01-02T15:04:05Z"))
	}
	if _, err := mesh.ParseMeshID(string(req.Mesh)); err != nil {
		return nil, deny("identity", "%v", err)
	}
	if _, err := mesh.ParseTrustDomain(string(req.TrustDomain)); err != nil {
		return nil, deny("identity", "%v", err)
	}
	if req.Mesh == e.cfg.Mesh || req.TrustDomain == e.cfg.TrustDomain {
		return nil, deny("identity", "dialer claims this mesh's own ID %s or trust domain %s", req.Mesh, req.TrustDomain)
	}
	// The pending peering itself holds p.Name; only the mesh and domain may not repeat.
	if err := e.checkNewPeerLocked(p.Name+"\x00", req.Mesh, req.TrustDomain); err != nil && !replay {
		return nil, deny("conflict", "%v", err)
	}
	if len(req.Addresses) == 0 || len(req.Addresses) > 16 {
		return nil, deny("identity", "%d addresses, want 1 to 16", len(req.Addresses))
	}
	for _, a := range req.Addresses {
		if err := checkHostPort(a); err != nil {
			return nil, deny("identity", "address %q: %v", a, err)
		}
	}
	roots, err := parseRoots(req.RootsPEM)
	if err != nil {
		return nil, deny("bundle", "%v", err)
	}
	if err := verifySVID(peerCerts(ctx), roots, req.TrustDomain); err != nil {
		return nil, deny("identity", "dialer of %s: %v", req.TrustDomain, err)
	}
	if !replay {
		// The secret's hash stays while ESTABLISHING (replays above); TERMINATED clears it.
		old := *p
		p.State = StateEstablishing
		p.PeerMesh, p.PeerTrustDomain, p.PeerAddresses, p.PeerRootsPEM = req.Mesh, req.TrustDomain, req.Addresses, req.RootsPEM
		if req.GossipAddr != "" && checkHostPort(req.GossipAddr) == nil {
			p.PeerGossip = []string{req.GossipAddr}
		}
		if err := e.saveLocked(); err != nil {
			*p = old
			return nil, status.Errorf(codes.Unavailable, "federation: save peering: %v", err)
		}
	}
	resp := &establishResponse{FederationID: e.state.FederationID, FederationSecret: e.state.FederationSecret}
	if e.pool != nil {
		resp.GossipAddrs = joinSeeds(e.pool.Addr(), e.pool.Members(), maxJoinSeeds)
	}
	e.log.Info("peering established", "peer", p.Name, "mesh", req.Mesh, "trust_domain", req.TrustDomain)
	e.kick()
	return resp, nil
}

// maxJoinSeeds is how many pool members an acceptor gives a dialer to join: itself and a
// few others, so that the join survives one of them being down. Gossip spreads the rest
// of the membership; joining every member made setting up n meshes O(n²) push/pulls of
// an O(n) member list (docs/benchmarks.md, "Federation").
const maxJoinSeeds = 3

// joinSeeds returns self followed by up to n-1 other alive members' addresses, picked at
// random so that many dialers do not all push/pull with the same few members.
func joinSeeds(self string, members []Member, n int) []string {
	out := []string{self}
	var others []string
	for _, m := range members {
		if m.Alive && m.Addr != self {
			others = append(others, m.Addr)
		}
	}
	mrand.Shuffle(len(others), func(i, j int) { others[i], others[j] = others[j], others[i] })
	return append(out, others[:min(len(others), n-1)]...)
}
