package federation

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// watch serves one peer its catalog: the client must present a certificate of a peered
// trust domain chaining to that peering's bundle, and name the peer's mesh. The catalog
// is sent whole at once and after every change of the exports, until the peering is
// deleted or the peer goes away.
func (e *Endpoint) watch(req *watchRequest, stream grpc.ServerStream) error {
	ctx := stream.Context()
	deny := func(code codes.Code, reason, format string, args ...any) error {
		e.metrics.streamRefused.WithLabelValues("server", reason).Inc()
		msg := fmt.Sprintf(format, args...)
		e.log.Warn("catalog stream refused", "reason", reason, "detail", msg)
		return status.Error(code, "federation: watch refused: "+msg)
	}
	certs := peerCerts(ctx)
	if len(certs) == 0 {
		return deny(codes.Unauthenticated, "certificate", "no client certificate")
	}
	leaf, err := x509.ParseCertificate(certs[0])
	if err != nil {
		return deny(codes.Unauthenticated, "certificate", "%v", err)
	}
	td, err := svidDomain(leaf)
	if err != nil {
		return deny(codes.Unauthenticated, "certificate", "%v", err)
	}
	e.mu.Lock()
	i := slices.IndexFunc(e.state.Peerings, func(p Peering) bool {
		return p.PeerTrustDomain == td && p.State != StateTerminated && p.State != StatePending
	})
	if i < 0 {
		e.mu.Unlock()
		return deny(codes.PermissionDenied, ReasonTrustDomain, "no peering with trust domain %s", td)
	}
	p := e.state.Peerings[i]
	rt := e.rt[p.Name+"/"+p.ID]
	e.mu.Unlock()
	// The certificate proves a trust domain; the peering binds it to one mesh ID.
	if req.Mesh != p.PeerMesh {
		return deny(codes.PermissionDenied, ReasonMesh, "trust domain %s is peered as mesh %s, not %s", td, p.PeerMesh, req.Mesh)
	}
	roots, err := parseRoots(p.PeerRootsPEM)
	if err != nil {
		return status.Errorf(codes.Internal, "federation: watch: stored bundle of %s: %v", p.Name, err)
	}
	if err := verifySVID(certs, roots, td); err != nil {
		return deny(codes.PermissionDenied, "bundle", "%v", err)
	}
	if rt == nil {
		return status.Errorf(codes.Unavailable, "federation: watch: peering %s is starting; retry", p.Name)
	}
	for {
		gen, changed := e.exportsNow()
		var exports []Export
		if e.cfg.Exports != nil {
			exports = e.cfg.Exports.Exports()
		}
		cat := catalogFor(e.cfg.Mesh, e.cfg.TrustDomain, p.PeerMesh, e.seqBase+gen, exports, e.cfg.Gateways)
		b, err := json.Marshal(cat)
		if err != nil {
			return status.Errorf(codes.Internal, "federation: encode catalog: %v", err)
		}
		if err := stream.SendMsg(&rawFrame{b: b}); err != nil {
			return err
		}
		e.mu.Lock()
		if j := slices.IndexFunc(e.state.Peerings, func(q Peering) bool { return q.ID == p.ID && q.Name == p.Name }); j >= 0 {
			e.state.Peerings[j].Exported = len(cat.Services)
		}
		e.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-rt.done:
			return status.Error(codes.PermissionDenied, "federation: peering deleted")
		case <-changed:
		}
	}
}

// watchPeer keeps a catalog stream open to the peer of peering name/id until ctx ends,
// reconnecting every RetryInterval.
func (e *Endpoint) watchPeer(ctx context.Context, name, id string) {
	for ctx.Err() == nil {
		e.mu.Lock()
		i := slices.IndexFunc(e.state.Peerings, func(p Peering) bool { return p.Name == name && p.ID == id })
		var p Peering
		if i >= 0 {
			p = e.state.Peerings[i]
		}
		e.mu.Unlock()
		if i < 0 || p.State == StateTerminated {
			return
		}
		roots, err := parseRoots(p.PeerRootsPEM)
		if err != nil {
			e.streamDown(name, id, fmt.Errorf("stored bundle: %w", err))
			return
		}
		var errs []error
		for _, addr := range p.PeerAddresses {
			err := e.watchOnce(ctx, addr, p, roots)
			if ctx.Err() != nil {
				return
			}
			errs = append(errs, fmt.Errorf("%s: %w", addr, err))
		}
		e.streamDown(name, id, errors.Join(errs...))
		select {
		case <-ctx.Done():
			return
		case <-time.After(e.cfg.RetryInterval):
		}
	}
}

// watchOnce runs one catalog stream to addr until it breaks.
func (e *Endpoint) watchOnce(ctx context.Context, addr string, p Peering, roots []*x509.Certificate) error {
	var proved sync.Map // the trust domain the server's certificate proved
	tlsConf := verifyingTLS(roots, p.PeerTrustDomain, e.cfg.Certificate)
	verify := tlsConf.VerifyPeerCertificate
	tlsConf.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		if err := verify(raw, chains); err != nil {
			// Whoever answers at the peer's address is not the peer: count it (the
			// reason reaches the peering through streamDown).
			reason := "bundle"
			if errors.Is(err, errWrongDomain) {
				reason = ReasonTrustDomain
			}
			e.metrics.streamRefused.WithLabelValues("client", reason).Inc()
			e.log.Warn("peer's catalog endpoint refused", "peer", p.Name, "addr", addr, "reason", reason, "err", err)
			return err
		}
		proved.Store("td", p.PeerTrustDomain)
		return nil
	}
	conn, err := dial(addr, tlsConf)
	if err != nil {
		return err
	}
	defer conn.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := conn.NewStream(sctx, &grpc.StreamDesc{ServerStreams: true}, methodWatch)
	if err != nil {
		return err
	}
	if err := stream.SendMsg(&watchRequest{Mesh: e.cfg.Mesh}); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	for {
		var f rawFrame
		if err := stream.RecvMsg(&f); err != nil {
			return err
		}
		td, _ := proved.Load("td")
		provedTD, _ := td.(mesh.TrustDomain)
		e.onCatalog(p.Name, p.ID, f.b, provedTD)
	}
}

// onCatalog judges a catalog frame from peering name/id and applies it whole, or keeps
// the previous imports and records why not.
func (e *Endpoint) onCatalog(name, id string, b []byte, proved mesh.TrustDomain) {
	e.mu.Lock()
	defer e.mu.Unlock()
	defer e.kick()
	i := slices.IndexFunc(e.state.Peerings, func(p Peering) bool { return p.Name == name && p.ID == id && p.State != StateTerminated })
	rt := e.rt[name+"/"+id]
	if i < 0 || rt == nil {
		return
	}
	p := &e.state.Peerings[i]
	rt.streamUp, rt.everUp, rt.streamErr = true, true, nil
	p.LastContact = e.cfg.Now().UTC()
	c, err := DecodeCatalog(b)
	var refused []error
	if err == nil {
		c, refused, err = CheckReceived(c, PeerClaim{Mesh: p.PeerMesh, TrustDomain: p.PeerTrustDomain, Proved: proved}, e.cfg.Mesh, p.CatalogSequence)
	}
	if err != nil {
		e.metrics.catalogRefused.WithLabelValues(string(p.PeerMesh), RefusalReason(err)).Inc()
		e.log.Warn("catalog refused; previous imports kept", "peer", name, "err", err)
		p.ImportError = err.Error()
		return
	}
	p.ImportError, p.CatalogSequence = "", c.Sequence
	var msgs []string
	for _, r := range refused {
		e.metrics.catalogRefused.WithLabelValues(string(p.PeerMesh), RefusalReason(r)).Inc()
		e.log.Warn("catalog entry refused; the rest applied", "peer", name, "err", r)
		msgs = append(msgs, r.Error())
	}
	if len(refused) > 0 {
		p.ImportError = fmt.Sprintf("%d of %d catalog entries refused, the rest imported: %s", len(refused), len(refused)+len(c.Services), strings.Join(msgs, "; "))
	}
	rt.held = importsOf(c)
	if !rt.withdrawn { // withdrawn imports return when the peering is ACTIVE again
		e.replaceImportsLocked(p, rt.held)
	}
}

// streamDown records that peering name/id has no catalog stream. A peer that refuses us
// outright (PermissionDenied: it deleted the peering) has revoked it: its imports go at
// once, without waiting for the stale window.
func (e *Endpoint) streamDown(name, id string, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	defer e.kick()
	rt := e.rt[name+"/"+id]
	if rt == nil {
		return
	}
	rt.streamUp, rt.streamErr = false, err
	if hasCode(err, codes.PermissionDenied) {
		rt.revoked = true
	}
}

// hasCode reports whether any error joined in err carries code.
func hasCode(err error, code codes.Code) bool {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if hasCode(e, code) {
				return true
			}
		}
		return false
	}
	for err != nil {
		if s, ok := status.FromError(err); ok && s.Code() == code {
			return true
		}
		err = errors.Unwrap(err)
	}
	return false
}
