// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 for querywarden's
// test harness.
//
// etcd's own main package lives in the go.etcd.io/etcd/v3 module, whose go.mod maps the
// other etcd modules with local replace directives, so `go install` refuses it. This
// wrapper does what that main.go does, from a module whose go.mod requires the released
// etcd modules at one version (tools/versions.env, ETCD_VERSION).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
