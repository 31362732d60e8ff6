// Command etcd is etcd's server built from its Go module. `go install` of
// go.etcd.io/etcd/server/v3 is refused because etcd's go.mod has replace directives, so
// this three-line main lives in the tools module instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
