// Command etcd is etcd's own server entry point (etcdmain.Main), built inside
// the Kubernetes wrapper module so it shares one dependency graph and build
// cache with the Kubernetes binaries; the etcd version is whatever
// k8s.io/kubernetes v1.30.x pins (go.etcd.io/etcd/server/v3 v3.5.x).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
