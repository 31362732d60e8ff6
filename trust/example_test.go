package trust_test

import (
	"fmt"

	"github.com/isthmus-mesh/isthmus/trust"
)

// A mesh's trust starts with one root per trust domain. The root names the domain in a
// SPIFFE URI, which is how a reader of its certificate (or of root-cert.pem) tells which
// domain it anchors.
func ExampleNewRoot() {
	root, err := trust.NewRoot("example.org", trust.RootOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(root.Cert.Subject.CommonName)
	fmt.Println("CA:", root.Cert.IsCA)
	fmt.Println("trust domain:", root.Cert.URIs[0])
	fmt.Println("self-signed:", root.Cert == root.Root)
	// Output:
	// Isthmus root CA for example.org
	// CA: true
	// trust domain: spiffe://example.org
	// self-signed: true
}

// Each cluster signs with its own intermediate under the root, in Istio's plug-in CA
// layout. The intermediate is name-constrained to the root's trust domain and may sign
// only leaves, so a stolen cluster key cannot mint identities of another domain or
// another CA.
func ExampleAuthority_NewIntermediate() {
	root, err := trust.NewRoot("example.org", trust.RootOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	inter, err := root.NewIntermediate(trust.IntermediateOptions{Cluster: "east-1"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(inter.Cert.Subject.CommonName)
	fmt.Println("CA:", inter.Cert.IsCA, "max path length:", inter.Cert.MaxPathLen)
	fmt.Println("permitted URI domains:", inter.Cert.PermittedURIDomains)
	fmt.Println("trust domain:", inter.TrustDomain)
	fmt.Println("chain ends with the root:", inter.Chain[len(inter.Chain)-1] == root.Cert)
	files, _ := inter.PluggedFiles()
	fmt.Println(len(files), "plug-in CA files, e.g.", trust.CACertFile)
	// Output:
	// Isthmus intermediate CA for cluster east-1
	// CA: true max path length: 0
	// permitted URI domains: [example.org]
	// trust domain: example.org
	// chain ends with the root: true
	// 4 plug-in CA files, e.g. ca-cert.pem
}
