package main

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"

	"github.com/isthmus-mesh/isthmus/federation"
	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
	"github.com/isthmus-mesh/isthmus/trust"
)

// buildFollower makes the mesh federation of a primary that follows the mesh's
// federation endpoint (--federation-follow; docs/federation.md, "Imports reach every
// primary of the mesh"): the imports go into this primary's registry and ServiceImports
// in its cluster, the peers' bundles into its cluster's bundle store, exactly as on the
// endpoint's own primary.
func (f *meshFederationFlags) buildFollower(ca *caServer, p *primary.Primary, td mesh.TrustDomain, namespace string, client kubernetes.Interface, rc *rest.Config, reg prometheus.Registerer, log *slog.Logger) (*meshFederation, error) {
	if ca == nil {
		return nil, errors.New("--federation-follow needs --ca-dir: the follower proves the mesh's federation identity with a certificate of the mesh CA")
	}
	cctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	err := federation.ApplyCRDs(cctx, rc)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("mesh federation needs the MCS CRDs (ServiceImport): %w", err)
	}
	mcs, err := mcsclient.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	imports := federation.NewKubeImports(mcs, log.With("component", "federation-imports"))
	bundles := federation.NewStoreBundles(trust.BundleStore{Client: client, Namespace: namespace}, log.With("component", "federation-bundles"))
	certs := &endpointCerts{ca: ca, namespace: namespace}
	fl, err := federation.NewFollower(federation.FollowerConfig{Address: f.follow, TrustDomain: td, Certificate: certs.get,
		Roots:   func() []*x509.Certificate { return ca.ca.CurrentAuthority().TrustAnchors() },
		Imports: fanOut{registryImports{reg: p.Registry()}, imports}, PeerBundles: bundles, Exports: registryExports{reg: p.Registry()},
		StaleWindow: f.staleWindow, Log: log, Metrics: reg})
	if err != nil {
		return nil, err
	}
	log.Info("following the mesh's federation endpoint", "endpoint", f.follow)
	return &meshFederation{follower: fl, imports: imports, bundles: bundles, log: log}, nil
}
