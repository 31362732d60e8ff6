package trust

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	secretservice "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/isthmus-mesh/isthmus/mesh"
)

// spiffeValidator is Envoy's SPIFFE certificate validator extension. The secrets' own
// names (mesh.SDSIdentitySecret, mesh.SDSRootSecret) are wire vocabulary shared with the
// primary, so they live in mesh.
const spiffeValidator = "envoy.tls.cert_validator.spiffe"

// SDSConfig configures an SDS server.
type SDSConfig struct {
	// Bundles, when set, are the trust domains peers may come from: ROOTCA becomes Envoy's
	// SPIFFE validator with one bundle per domain, so each domain's roots vouch only for
	// its own identities (never merged). When nil, ROOTCA trusts the root that ended the
	// workload's own chain.
	Bundles *BundleSet
	// Log receives refused updates; nil discards.
	Log *slog.Logger
}

// SDS serves a workload's certificate and roots to Envoy over the Secret Discovery Service
// (as go-control-plane secret resources), the way Istio's agent does on its Unix socket:
// secrets "default" and "ROOTCA". Feed it from an Agent (AgentConfig.OnIssue = sds.Update);
// every new certificate is pushed to connected proxies. A library for now: no Isthmus
// process serves SDS yet (the scenario workloads are proxyless gRPC and read the Agent's
// files).
type SDS struct {
	cfg   SDSConfig
	cache *cache.LinearCache

	// mu guards last and is held for a whole publish, so publishes happen one at a time
	// and in order: a RefreshBundles racing an Update can never publish the older
	// certificate after the newer one.
	mu sync.Mutex
	// last is the latest certificate.
	last *Issued
}

// NewSDS returns an SDS server with no secrets yet: requests wait until the first Update.
func NewSDS(cfg SDSConfig) *SDS {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &SDS{cfg: cfg, cache: cache.NewLinearCache(resource.SecretType)}
}

// Register adds the SecretDiscoveryService to g. ctx bounds the server's streams.
func (s *SDS) Register(ctx context.Context, g *grpc.Server) {
	secretservice.RegisterSecretDiscoveryServiceServer(g, server.NewServer(ctx, s.cache, nil))
}

// Update publishes a new certificate (and the roots) to every proxy.
func (s *SDS) Update(in Issued) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.last = &in
	if err := s.publishLocked(); err != nil {
		// Only a malformed certificate from the CA gets here; the old secrets stay.
		s.cfg.Log.Error("SDS update refused; proxies keep the previous secrets", "err", err)
	}
}

// RefreshBundles re-publishes ROOTCA after the bundle set changed (a peer domain added or
// removed, a root rotated).
func (s *SDS) RefreshBundles() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.publishLocked()
}

// publishLocked builds both secrets from the last certificate and the bundle set as they
// are now, validates them, and replaces them in one cache update, so a proxy never gets a
// certificate without its roots. Nothing is published before the first Update. s.mu must
// be held.
func (s *SDS) publishLocked() error {
	last := s.last
	if last == nil {
		return nil
	}
	root, err := s.rootSecret(last.RootPEM)
	if err != nil {
		return err
	}
	ident := &tlsv3.Secret{Name: mesh.SDSIdentitySecret, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: inline(last.ChainPEM),
		PrivateKey:       inline(last.KeyPEM),
	}}}
	for _, sec := range []*tlsv3.Secret{ident, root} {
		if err := sec.Validate(); err != nil {
			return fmt.Errorf("trust: sds: secret %s: %w", sec.Name, err)
		}
	}
	return s.cache.UpdateResources(map[string]types.Resource{mesh.SDSIdentitySecret: ident, mesh.SDSRootSecret: root}, nil)
}

// rootSecret is ROOTCA: the workload's own root, or a SPIFFE validator over the bundle set.
func (s *SDS) rootSecret(ownRoot []byte) (*tlsv3.Secret, error) {
	vc := &tlsv3.CertificateValidationContext{}
	if s.cfg.Bundles == nil || len(s.cfg.Bundles.Domains()) == 0 {
		vc.TrustedCa = inline(ownRoot)
	} else {
		spiffe := &tlsv3.SPIFFECertValidatorConfig{}
		for _, td := range s.cfg.Bundles.Domains() {
			b, _ := s.cfg.Bundles.Get(td)
			roots := certsPEM(b.X509Authorities())
			if len(roots) == 0 {
				continue // a JWT-only bundle has nothing for Envoy to validate X.509 with
			}
			spiffe.TrustDomains = append(spiffe.TrustDomains, &tlsv3.SPIFFECertValidatorConfig_TrustDomain{
				Name: string(td), TrustBundle: inline(roots)})
		}
		if len(spiffe.TrustDomains) == 0 {
			return nil, errors.New("trust: sds: the bundle set holds no X.509 roots")
		}
		a, err := anypb.New(spiffe)
		if err != nil {
			return nil, err
		}
		vc.CustomValidatorConfig = &core.TypedExtensionConfig{Name: spiffeValidator, TypedConfig: a}
	}
	return &tlsv3.Secret{Name: mesh.SDSRootSecret, Type: &tlsv3.Secret_ValidationContext{ValidationContext: vc}}, nil
}

func inline(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}
