// Command coredns is CoreDNS with only the plugins a cluster DNS needs, built from
// github.com/coredns/coredns for querywarden's test node (the in-cluster DNS pod,
// localhost/querywarden-coredns:dev, scripts/build-node-images.sh).
//
// CoreDNS's own main imports core/plugin (zplugin.go), which pulls in every plugin and
// with them the cloud SDKs of route53, azure and clouddns. This is the documented way to
// compile CoreDNS with a chosen plugin set: import those plugins, give
// dnsserver.Directives the same names in the order of core/dnsserver/zdirectives.go (the
// order in which a request passes through them, whatever the Corefile's order), and call
// coremain.Run. The set covers the Corefile that kubeadm and CoreDNS's Kubernetes
// manifests deploy (errors, health, ready, kubernetes, prometheus, forward, cache, loop,
// reload, loadbalance) plus log and hosts. A Corefile naming any other plugin is refused
// at start-up with "Unknown directive". (`coredns -plugins` also lists plugins these pull in
// as libraries, such as dnstap and transfer; having no directive here, they cannot be used.)
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives is core/dnsserver/zdirectives.go reduced to the plugins imported above, in
// its order. "prometheus" is the directive of plugin/metrics.
var directives = []string{
	"reload",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"hosts",
	"kubernetes",
	"loop",
	"forward",
}

func init() {
	// Runs after coremain's init (which registers the "dns" server type): the server type
	// reads dnsserver.Directives when it parses a Corefile, not at registration.
	if err := dnsserver.SetDirectives(directives); err != nil {
		panic(err)
	}
}

func main() {
	coremain.Run()
}
