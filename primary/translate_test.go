package primary

import (
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func TestTranslateEndpoints(t *testing.T) {
	pods := map[string]*corev1.Pod{
		"labelled": {ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "labelled", Labels: map[string]string{LabelNetwork: "pod-net", LabelTLSMode: TLSModeIstio}},
			Spec: corev1.PodSpec{ServiceAccountName: "echo", NodeName: "n1"}},
		"plain": {ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "plain"}, Spec: corev1.PodSpec{NodeName: "n1"}},
	}
	tr := translator{
		cluster: "c1", defaultNetwork: "cluster-net", trustDomain: "td", domain: "cluster.local",
		cidrs: []NetworkCIDR{{Prefix: netip.MustParsePrefix("10.9.0.0/16"), Network: "cidr-net"}},
		pod:   func(ns, name string) *corev1.Pod { return pods[name] },
		node: func(name string) *corev1.Node {
			return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelTopologyRegion: "r1", corev1.LabelTopologyZone: "z1"}}}
		},
		namespace: func(name string) *corev1.Namespace {
			return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{}}}
		},
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "echo"}, Spec: corev1.ServiceSpec{
		ClusterIP: "10.96.0.5",
		Ports:     []corev1.ServicePort{{Name: "grpc-echo", Port: 80}, {Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP}},
	}}
	s, ok := tr.service(svc)
	if !ok || s.Hostname != "echo.demo.svc.cluster.local" || len(s.Ports) != 1 || s.Ports[0].Protocol != mesh.ProtocolGRPC || s.VIP.String() != "10.96.0.5" {
		t.Fatalf("service: %+v", s)
	}
	ready, notReady, term := true, false, true
	name, port := "grpc-echo", int32(8080)
	ref := func(n string) *corev1.ObjectReference {
		return &corev1.ObjectReference{Kind: "Pod", Namespace: "demo", Name: n}
	}
	slice := &discoveryv1.EndpointSlice{
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}, TargetRef: ref("labelled")},
			{Addresses: []string{"10.9.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &notReady, Terminating: &term}, TargetRef: ref("plain")},
			{Addresses: []string{"10.1.0.3"}, Conditions: discoveryv1.EndpointConditions{Ready: &notReady}},
		},
	}
	eps := tr.endpoints(svc, []*discoveryv1.EndpointSlice{slice, slice}) // duplicates collapse
	if len(eps) != 3 {
		t.Fatalf("endpoints: %+v", eps)
	}
	byAddr := map[string]mesh.Endpoint{}
	for _, e := range eps {
		byAddr[e.Address.String()] = e
	}
	a := byAddr["10.1.0.1"]
	if a.Network != "pod-net" || !a.MTLSReady || a.Identity.String() != "spiffe://td/ns/demo/sa/echo" || a.Health != mesh.HealthHealthy ||
		a.Locality != (mesh.Locality{Region: "r1", Zone: "z1"}) || a.Ports[0].Number != 8080 || a.Ports[0].Name != "grpc-echo" {
		t.Fatalf("labelled pod endpoint: %+v", a)
	}
	b := byAddr["10.9.0.1"]
	if b.Network != "cidr-net" || b.MTLSReady || b.Identity.String() != "spiffe://td/ns/demo/sa/default" || b.Health != mesh.HealthDraining {
		t.Fatalf("plain pod endpoint: %+v", b)
	}
	c := byAddr["10.1.0.3"]
	if c.Network != "cluster-net" || !c.Identity.IsZero() || c.Health != mesh.HealthUnhealthy {
		t.Fatalf("podless endpoint: %+v", c)
	}
	if _, ok := tr.service(&corev1.Service{Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName}}); ok {
		t.Fatal("ExternalName services are not meshed")
	}
}

func TestGatewaysOf(t *testing.T) {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{LabelNetwork: "n2"}},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 15443}}, ExternalIPs: []string{"192.0.2.1"}},
		Status:     corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{{IP: "198.51.100.1"}, {Hostname: "lb.example.com"}}}},
	}
	gws := gatewaysOf("c2", s)
	if len(gws) != 2 || gws[0].Address.String() != "198.51.100.1" || gws[1].Network != "n2" || gws[1].Port != 15443 {
		t.Fatalf("gateways: %+v", gws)
	}
	s.Spec.Ports[0].Port = 443
	if len(gatewaysOf("c2", s)) != 0 {
		t.Fatal("a service without port 15443 is not a network gateway")
	}
}
