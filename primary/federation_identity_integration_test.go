package primary_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"strconv"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"

	"github.com/isthmus-mesh/isthmus/mesh"
	"github.com/isthmus-mesh/isthmus/primary"
)

// TestImportRequiresServerIdentity: a real grpc-go xDS client dials an import
// (echo.authz.svc.mesh-x.isthmus) whose endpoint is a peer's gateway, here a plain mTLS
// server standing for the exporting mesh's workload behind it, running as
// spiffe://cluster.local/ns/authz/sa/impostor. The import's clusters carry the exporter's
// identities as SAN matchers: while the catalog lists the impostor's service account the
// call is answered; listing only sa/echo makes the same client's calls fail (the server's
// certificate chains to the trusted root but proves another identity); an import naming
// no identity requires the exporter's trust domain alone (this one passes, another
// domain's fails).
func TestImportRequiresServerIdentity(t *testing.T) {
	needEnv(t)
	ca := newTestCA(t)
	const serverIP = "10.99.47.1"
	if err := env.pods.AddAddr(netip.MustParseAddr(serverIP)); err != nil {
		t.Fatal(err)
	}
	lis, err := env.pods.Listen(net.JoinHostPort(serverIP, strconv.Itoa(authzPort)))
	if err != nil {
		t.Fatal(err)
	}
	_, kp := ca.issue(t, "impostor")
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{kp},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS13})))
	testgrpc.RegisterTestServiceServer(srv, &identityServer{name: "behind-gateway"})
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)

	reg := env.primary.Registry()
	key := primary.ShardKey{Source: "federation", Cluster: "mesh-x"}
	t.Cleanup(func() { reg.ReplaceShard(key, nil) })
	host := mesh.ServiceKey{Namespace: "authz", Name: "echo"}.FederatedHostname("mesh-x")
	gw := netip.MustParseAddr(serverIP)
	network := mesh.NetworkID("federation-mesh-x")
	imp := func(td mesh.TrustDomain, ids ...string) {
		svc := &primary.Service{Hostname: host, Key: mesh.ServiceKey{Namespace: "authz", Name: "echo"}, TrustDomain: td,
			Ports: []primary.ServicePort{{Name: "grpc", Port: authzPort, Protocol: mesh.ProtocolGRPC}}}
		for _, id := range ids {
			v, err := mesh.ParseIdentity(id)
			if err != nil {
				t.Fatal(err)
			}
			svc.Identities = append(svc.Identities, v)
		}
		reg.ReplaceShard(key, &primary.ShardData{
			Services: map[mesh.Hostname]*primary.Service{host: svc},
			Endpoints: map[mesh.Hostname][]mesh.Endpoint{host: {{Address: gw, Cluster: "mesh-x", Network: network, Health: mesh.HealthHealthy, MTLSReady: true,
				Ports: []mesh.Port{{Name: "grpc", Number: authzPort, Protocol: mesh.ProtocolGRPC}}}}},
			Gateways: []primary.Gateway{{Network: network, Address: gw, Port: authzPort, Cluster: "mesh-x"}},
		})
	}
	// A new client each step: grpc-go checks the SANs at the handshake, and a connection
	// made under the previous configuration stays up.
	client := func() map[string]testgrpc.TestServiceClient {
		return map[string]testgrpc.TestServiceClient{"client": proxylessCaller(t, ca, "client", string(host))}
	}
	ids := map[string]string{"client": "spiffe://cluster.local/ns/authz/sa/client"}
	ok := map[string]codes.Code{"client": codes.OK}
	refused := map[string]codes.Code{"client": codes.Unavailable}

	imp("cluster.local", "spiffe://cluster.local/ns/authz/sa/echo", "spiffe://cluster.local/ns/authz/sa/impostor")
	expect(t, "the server's identity is one of the import's: answered", ok, client(), ids)
	imp("cluster.local", "spiffe://cluster.local/ns/authz/sa/echo")
	expect(t, "the server proves sa/impostor, the import lists sa/echo only: refused", refused, client(), ids)
	imp("cluster.local")
	expect(t, "no identities listed: any identity of the exporter's trust domain", ok, client(), ids)
	imp("other.example")
	expect(t, "no identities listed, the server of another trust domain: refused", refused, client(), ids)
}
