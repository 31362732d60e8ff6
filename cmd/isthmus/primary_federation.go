package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/trust"
)

// federationFlags are the primary's multi-trust flags: its own bundle endpoint and the
// federation with peer trust domains.
type federationFlags struct {
	enabled                   bool
	bundleAddr, profile       string
	webCert, webKey           string
	refreshHint, fetchTimeout time.Duration
	minRefresh                time.Duration
}

func (f *federationFlags) register(fs *pflag.FlagSet) {
	fs.BoolVar(&f.enabled, "federation", true, "with --ca-dir: fetch the bundles of the peer trust domains listed in the "+trust.FederationConfigMap+" ConfigMap and keep them, with this domain's own bundle, in "+trust.BundleConfigMap+" for workloads")
	fs.StringVar(&f.bundleAddr, "bundle-addr", "", "address of this trust domain's SPIFFE bundle endpoint (HTTPS, path /); off when empty")
	fs.StringVar(&f.profile, "bundle-profile", trust.ProfileSPIFFE, "bundle endpoint profile: https_spiffe (an SVID of this domain) or https_web (--bundle-web-cert/--bundle-web-key)")
	fs.StringVar(&f.webCert, "bundle-web-cert", "", "https_web: PEM certificate chain of the bundle endpoint (Web PKI)")
	fs.StringVar(&f.webKey, "bundle-web-key", "", "https_web: PEM private key of the bundle endpoint")
	fs.DurationVar(&f.refreshHint, "bundle-refresh-hint", 5*time.Minute, "spiffe_refresh_hint the bundle endpoint serves: how often peers fetch it")
	fs.DurationVar(&f.fetchTimeout, "federation-fetch-timeout", 10*time.Second, "longest one fetch of a peer's bundle may take")
	fs.DurationVar(&f.minRefresh, "federation-min-refresh", time.Second, "shortest interval between fetches of a peer's bundle, whatever its refresh hint")
}

// federationRunner is the primary's multi-trust part once configured.
type federationRunner struct {
	fed      *trust.Federation
	endpoint *trust.BundleEndpoint
	listener net.Listener
	tls      *tls.Config
}

// newFederation builds the bundle endpoint and the federation; nil when off or without a CA.
func (f *federationFlags) build(ctx context.Context, ca *caServer, client kubernetes.Interface, td mesh.TrustDomain, namespace string, reg prometheus.Registerer, log *slog.Logger) (*federationRunner, error) {
	if ca == nil || !f.enabled {
		if f.bundleAddr != "" {
			return nil, errors.New("--bundle-addr needs --ca-dir (the bundle is the CA's roots) and --federation")
		}
		return nil, nil
	}
	anchors := func() []*x509.Certificate { return ca.ca.CurrentAuthority().TrustAnchors() }
	store := trust.BundleStore{Client: client, Namespace: namespace}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	seq := trust.StartSequence(sctx, store, td, anchors())
	cancel()
	ep, err := trust.NewBundleEndpoint(trust.BundleEndpointConfig{TrustDomain: td, Anchors: anchors, RefreshHint: f.refreshHint, Sequence: seq, Metrics: reg})
	if err != nil {
		return nil, err
	}
	fed, err := trust.NewFederation(trust.FederationConfig{TrustDomain: td, Client: client, Namespace: namespace, Endpoint: ep,
		FetchTimeout: f.fetchTimeout, MinRefresh: f.minRefresh, Log: log.With("component", "federation"), Metrics: reg})
	if err != nil {
		return nil, err
	}
	r := &federationRunner{fed: fed, endpoint: ep}
	if f.bundleAddr == "" {
		return r, nil
	}
	switch f.profile {
	case trust.ProfileSPIFFE:
		if f.webCert != "" || f.webKey != "" {
			return nil, errors.New("--bundle-web-cert/--bundle-web-key are for --bundle-profile https_web")
		}
		id, err := trust.EndpointIdentity(td, namespace)
		if err != nil {
			return nil, err
		}
		r.tls = trust.SPIFFETLSConfig(ca.ca.CurrentAuthority, id)
		log.Info("bundle endpoint profile https_spiffe", "endpoint_spiffe_id", id.String())
	case trust.ProfileWeb:
		if f.webCert == "" || f.webKey == "" {
			return nil, errors.New("--bundle-profile https_web needs --bundle-web-cert and --bundle-web-key")
		}
		kp, err := tls.LoadX509KeyPair(f.webCert, f.webKey)
		if err != nil {
			return nil, fmt.Errorf("--bundle-web-cert/--bundle-web-key: %w", err)
		}
		r.tls = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{kp}}
	default:
		return nil, fmt.Errorf("--bundle-profile %q: want %s or %s", f.profile, trust.ProfileSPIFFE, trust.ProfileWeb)
	}
	if r.listener, err = net.Listen("tcp", f.bundleAddr); err != nil {
		return nil, fmt.Errorf("bundle endpoint listener: %w", err)
	}
	log.Info("bundle endpoint serving", "address", r.listener.Addr().String(), "trust_domain", td, "sequence", seq)
	return r, nil
}

// start runs the federation and the bundle endpoint in g until ctx ends, and mounts
// /debug/trustz with the CA's and the federation's status.
func (r *federationRunner) start(ctx context.Context, g *errgroup.Group, ca *caServer, mux *http.ServeMux) {
	mux.Handle("/debug/trustz", trust.TrustzHandler(ca.ca, r.fed))
	g.Go(func() error { return r.fed.Run(ctx) })
	if r.listener == nil {
		return
	}
	g.Go(func() error { return serveHTTP(ctx, tls.NewListener(r.listener, r.tls), r.endpoint) })
}
