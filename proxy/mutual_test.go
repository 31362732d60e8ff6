package proxy_test

import (
	"strings"
	"testing"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/wellknown"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/isthmus-mesh/isthmus/proxy"
)

// TestMutualTranslation: a chain that requires client certificates verified against an
// SDS validation context is translated with that context's name; every other client
// certificate setting is refused with the field named; a validation-context secret
// becomes a CA pool, and a malformed one is refused.
func TestMutualTranslation(t *testing.T) {
	ads := &core.ConfigSource{ConfigSourceSpecifier: &core.ConfigSource_Ads{Ads: &core.AggregatedConfigSource{}}}
	mk := func(require bool, vc *tlsv3.CommonTlsContext_CombinedCertificateValidationContext) *listener.Listener {
		d := &tlsv3.DownstreamTlsContext{CommonTlsContext: &tlsv3.CommonTlsContext{
			TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: "kubernetes://c", SdsConfig: ads}}}}
		if require {
			d.RequireClientCertificate = wrapperspb.Bool(true)
		}
		if vc != nil {
			d.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: vc}
		}
		ts, _ := anypb.New(d)
		m, _ := anypb.New(&hcm.HttpConnectionManager{RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{RouteConfigName: "r", ConfigSource: ads}}})
		return &listener.Listener{Name: "0.0.0.0_8443",
			Address:         &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{Address: "0.0.0.0", PortSpecifier: &core.SocketAddress_PortValue{PortValue: 8443}}}},
			ListenerFilters: []*listener.ListenerFilter{{Name: wellknown.TlsInspector}},
			FilterChains: []*listener.FilterChain{{FilterChainMatch: &listener.FilterChainMatch{ServerNames: []string{"a.example"}, TransportProtocol: "tls"},
				TransportSocket: &core.TransportSocket{Name: "envoy.transport_sockets.tls", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: ts}},
				Filters:         []*listener.Filter{{Name: wellknown.HTTPConnectionManager, ConfigType: &listener.Filter_TypedConfig{TypedConfig: m}}}}}}
	}
	good := &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{DefaultValidationContext: &tlsv3.CertificateValidationContext{},
		ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: "kubernetes://c-cacert", SdsConfig: ads}}
	l, err := proxy.TranslateListener(mk(true, good))
	if err != nil {
		t.Fatal(err)
	}
	if ch := l.Chains[0]; ch.ClientCA != "kubernetes://c-cacert" || ch.Secret != "kubernetes://c" {
		t.Fatalf("chain %+v", ch)
	}
	withSAN := &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
		DefaultValidationContext:         &tlsv3.CertificateValidationContext{AllowExpiredCertificate: true},
		ValidationContextSdsSecretConfig: good.ValidationContextSdsSecretConfig}
	noADS := &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{ValidationContextSdsSecretConfig: &tlsv3.SdsSecretConfig{Name: "x"}}
	for name, bad := range map[string]*listener.Listener{
		"optional client certificate": mk(false, good),
		"required without a CA":       mk(true, nil),
		"a default validation":        mk(true, withSAN),
		"a CA not over ADS":           mk(true, noADS),
	} {
		if _, err := proxy.TranslateListener(bad); err == nil || !strings.Contains(err.Error(), "transport_socket") {
			t.Errorf("%s: %v, want a refusal naming transport_socket", name, err)
		}
	}

	ca, _, _ := selfSigned(t, "client-ca")
	pool, err := proxy.TranslateValidationContext(&tlsv3.Secret{Name: "kubernetes://c-cacert", Type: &tlsv3.Secret_ValidationContext{
		ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: ca}}}}})
	if err != nil || pool == nil {
		t.Fatalf("validation context: %v", err)
	}
	if _, err := proxy.TranslateValidationContext(&tlsv3.Secret{Name: "bad", Type: &tlsv3.Secret_ValidationContext{
		ValidationContext: &tlsv3.CertificateValidationContext{TrustedCa: &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: []byte("junk")}}}}}); err == nil ||
		!strings.Contains(err.Error(), "no PEM certificate") {
		t.Errorf("junk CA: %v", err)
	}
}
