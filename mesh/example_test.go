package mesh_test

import (
	"errors"
	"fmt"

	"github.com/isthmus-mesh/isthmus/mesh"
)

func ExampleParseClusterID() {
	id, err := mesh.ParseClusterID("cluster-1")
	fmt.Println(id, err)

	_, err = mesh.ParseClusterID("-cluster")
	fmt.Println(err)
	// Output:
	// cluster-1 <nil>
	// mesh: invalid cluster ID "-cluster": must begin and end with a letter or digit
}

func ExampleParseIdentity() {
	id, err := mesh.ParseIdentity("spiffe://cluster.local/ns/demo/sa/echo")
	if err != nil {
		panic(err)
	}
	fmt.Println(id.TrustDomain, id.Namespace, id.ServiceAccount)

	_, err = mesh.ParseIdentity("spiffe://cluster.local/workload/echo")
	var pe *mesh.ParseError
	fmt.Println(errors.As(err, &pe), pe.Kind)
	// Output:
	// cluster.local demo echo
	// true SPIFFE identity
}

func ExampleServiceKeyFromHostname() {
	k, err := mesh.ServiceKeyFromHostname("echo.demo.svc.cluster.local", "")
	fmt.Println(k, err)
	fmt.Println(k.Hostname("example.org"))
	// Output:
	// demo/echo <nil>
	// echo.demo.svc.example.org
}

func ExampleParseLocality() {
	l, err := mesh.ParseLocality("us-east1/us-east1-b")
	fmt.Printf("%q %q %q %v\n", l.Region, l.Zone, l.Subzone, err)
	// Output:
	// "us-east1" "us-east1-b" "" <nil>
}

// A gateway reads the server name of a cross-network connection and looks up the cluster
// the primary named for the same service port.
func ExampleParseSNI() {
	n, err := mesh.ParseSNI("outbound_.8080_._.echo.demo.svc.cluster.local")
	if err != nil {
		panic(err)
	}
	fmt.Println(n.Port, n.Host)
	fmt.Println(n.ClusterName())

	_, err = mesh.ParseSNI("outbound_.99999_._.echo.demo.svc.cluster.local")
	fmt.Println(err)
	// Output:
	// 8080 echo.demo.svc.cluster.local
	// outbound|8080||echo.demo.svc.cluster.local
	// mesh: invalid cross-network SNI "outbound_.99999_._.echo.demo.svc.cluster.local": port "99999": larger than 65535
}

func ExampleOutboundName() {
	n := mesh.OutboundName{Port: 9090, Subset: "v2", Host: "api.shop.svc.cluster.local"}
	fmt.Println(n.SNI())
	fmt.Println(n.ClusterName())
	// Output:
	// outbound_.9090_.v2_.api.shop.svc.cluster.local
	// outbound|9090|v2|api.shop.svc.cluster.local
}
