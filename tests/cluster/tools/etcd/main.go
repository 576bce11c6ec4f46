// The etcd server of tests/cluster, built from go.etcd.io/etcd/server/v3 of one pinned release.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
