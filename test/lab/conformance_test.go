//go:build linux

package lab_test

// Differential conformance: one table of packet-flow cases (a source, a destination of a
// Service, a Service state) run in the lab against the real kube-proxy in iptables mode and
// in nftables mode, then against tern, with the same topology and the same Services. The
// outcome of a case is what a client can observe: which backends answered, or a rejection
// (TCP RST / ICMP unreachable), or a drop (no answer at all), and the source address each
// backend saw. kube-proxy is the oracle: both of its modes must give the table's outcome (so
// the table documents kube-proxy's behaviour and a broken lab cannot pass), and tern must
// give kube-proxy's. docs/conformance.md explains how to run it and lists the differences.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/sockclient"
	"github.com/tern-net/tern/test/lab"
)

// feature is a part of Service handling a case depends on.
type feature string

const (
	featClusterIP   feature = "clusterip"     // ClusterIP from pods
	featHostNet     feature = "hostnet"       // host-network clients (tern: socket LB)
	featAffinity    feature = "affinity"      // sessionAffinity: ClientIP
	featITPLocal    feature = "itp-local"     // internalTrafficPolicy: Local
	featTerminating feature = "terminating"   // serving-but-terminating endpoints
	featNoEndpoints feature = "no-endpoints"  // REJECT when a Service has no usable endpoint
	featHairpin     feature = "hairpin"       // a backend reaching its own Service
	featNodePort    feature = "nodeport"      // NodePort on the nodes' addresses
	featLB          feature = "loadbalancer"  // LoadBalancer ingress IPs
	featExternalIP  feature = "externalip"    // spec.externalIPs
	featETPLocal    feature = "etp-local"     // externalTrafficPolicy: Local
	featRanges      feature = "source-ranges" // loadBalancerSourceRanges
	featHostPort    feature = "hostport"      // a pod's hostPort (CNI portMappings)
)

// ternFeatures is THE switch: the features tern serves today. A case that needs anything
// else is run against both kube-proxy modes only and reported as "not compared" for tern
// (never as a pass). NodePort, LoadBalancer, externalIPs, externalTrafficPolicy: Local and
// source ranges come with the netdev object's north-south work, hostPort with the CNI
// portMappings work: add them here when those land.
func ternFeatures() map[feature]bool {
	return map[feature]bool{
		featClusterIP: true, featHostNet: true, featAffinity: true, featITPLocal: true,
		featTerminating: true, featNoEndpoints: true, featHairpin: true,
		featNodePort: true, featLB: true, featExternalIP: true, featETPLocal: true, featRanges: true,
	}
}

// source is who opens the connection.
type source string

const (
	fromPod       source = "pod"        // client pod c1 on node-1
	fromPodOther  source = "pod-other"  // client pod c2 on node-2
	fromHost      source = "host"       // a host-network process on node-1
	fromHostOther source = "host-other" // a host-network process on node-2
	fromExternal  source = "external"   // lab.ExternalClient, outside the VPC
	fromSelf      source = "self"       // backend a1, reaching a Service it backs (hairpin)
)

// dest is which of a Service's addresses the client dials.
type dest string

const (
	toClusterIP  dest = "clusterIP"
	toNodePort1  dest = "nodePort@node-1" // node-1's primary address
	toNodePort2  dest = "nodePort@node-2"
	toLB         dest = "loadBalancerIP" // routed by the VPC to node-1, as an SLB would send it
	toExternalIP dest = "externalIP"     // likewise routed to node-1
	// healthCheckNodePort (externalTrafficPolicy Local) on a node's primary address: an HTTP
	// GET whose status and localEndpoints are the outcome.
	toHealthCheck1 dest = "healthCheck@node-1"
	toHealthCheck2 dest = "healthCheck@node-2"
)

// The outcome kinds.
const (
	answered = "answered"
	rejected = "rejected" // the client was told at once: see isReject
	dropped  = "dropped"  // nothing came back within dropTimeout
)

// outcome is what a case observed. Backends and Seen are sorted, comma-joined names: the
// backend pods that answered, and who the backends saw as the client (a pod's name, a node's
// name for any of that node's own addresses, "external").
type outcome struct {
	Result   string
	Backends string
	Seen     string
}

func (o outcome) String() string {
	if strings.HasPrefix(o.Result, "HTTP ") {
		return o.Result + " " + o.Backends
	}
	if o.Result != answered {
		return o.Result
	}
	return fmt.Sprintf("answered by {%s}, saw {%s}", o.Backends, o.Seen)
}

func ans(backends, seen string) outcome {
	return outcome{Result: answered, Backends: backends, Seen: seen}
}

// sticky stands for "every try answered by the same one backend" in a sessionAffinity case.
const sticky = "one-for-all-tries"

// confCase is one row of the table.
type confCase struct {
	svc   string
	from  source
	to    dest
	udp   bool // the Service's UDP port (53 → 5353) instead of its TCP one
	needs []feature
	want  outcome
	// noOracle, when set, keeps the case out of every run and says why (what the lab lacks
	// to produce kube-proxy's side of it).
	noOracle string
	// ternDiffers, when set, says why tern's outcome is ternWant instead of want, on purpose.
	ternDiffers string
	ternWant    outcome
}

func (c confCase) name() string { return fmt.Sprintf("%s: %s -> %s", c.svc, c.from, c.dest()) }

// dest is the destination as the table shows it: "/udp" marks the UDP port.
func (c confCase) dest() string {
	if c.udp {
		return string(c.to) + "/udp"
	}
	return string(c.to)
}

// The intentional differences of external frontends (docs/architecture.md, "External
// frontends"; docs/conformance.md).
const (
	localKeepsClient = "with externalTrafficPolicy Cluster tern SNATs an external client's flow only when the backend " +
		"is on another node (the reply must come back through this node); a backend on this node is reached by DNAT " +
		"alone and sees the client, as with Cilium's kube-proxy replacement. kube-proxy masquerades both"
	podKeepsSource = "a pod's connection to a NodePort, LoadBalancer IP or externalIP of its own node is translated at " +
		"the pod's veth like a ClusterIP, without SNAT, so the backend sees the pod (as with Cilium); kube-proxy " +
		"masquerades traffic to external frontends"
	otherNodeKeepsPod = "a pod's connection to another node's NodePort is translated by that node's netdev programs: " +
		"its local backend sees the pod (DNAT only), a backend elsewhere sees that node (SNAT); kube-proxy masquerades both"
)

// conformanceCases is the table. The Services are conformanceServices'; a1 runs on node-1
// and b2 on node-2 (both labelled app=web; b2 also side=two, a1 solo=a1); c1 and c2 are
// client pods on node-1 and node-2.
func conformanceCases() []confCase {
	both := "a1,b2"
	return []confCase{
		// web: LoadBalancer, externalTrafficPolicy Cluster, externalIP, both backends.
		{svc: "web", from: fromPod, to: toClusterIP, needs: []feature{featClusterIP}, want: ans(both, "c1")},
		{svc: "web", from: fromPodOther, to: toClusterIP, needs: []feature{featClusterIP}, want: ans(both, "c2")},
		{svc: "web", from: fromHost, to: toClusterIP, needs: []feature{featHostNet}, want: ans(both, "node-1")},
		{svc: "web", from: fromHostOther, to: toClusterIP, needs: []feature{featHostNet}, want: ans(both, "node-2")},
		{svc: "web", from: fromExternal, to: toNodePort1, needs: []feature{featNodePort}, want: ans(both, "node-1"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-1")},
		{svc: "web", from: fromExternal, to: toNodePort2, needs: []feature{featNodePort}, want: ans(both, "node-2"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-2")},
		{svc: "web", from: fromExternal, to: toLB, needs: []feature{featLB}, want: ans(both, "node-1"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-1")},
		{svc: "web", from: fromExternal, to: toExternalIP, needs: []feature{featExternalIP}, want: ans(both, "node-1"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-1")},
		{svc: "web", from: fromPod, to: toNodePort1, needs: []feature{featNodePort}, want: ans(both, "node-1"), ternDiffers: podKeepsSource, ternWant: ans(both, "c1")},
		{svc: "web", from: fromPod, to: toNodePort2, needs: []feature{featNodePort}, want: ans(both, "node-2"), ternDiffers: otherNodeKeepsPod, ternWant: ans(both, "c1,node-2")},
		{svc: "web", from: fromHost, to: toNodePort1, needs: []feature{featNodePort, featHostNet}, want: ans(both, "node-1")},
		{svc: "web", from: fromPod, to: toLB, needs: []feature{featLB}, want: ans(both, "node-1"), ternDiffers: podKeepsSource, ternWant: ans(both, "c1")},
		{svc: "web", from: fromPod, to: toExternalIP, needs: []feature{featExternalIP}, want: ans(both, "node-1"), ternDiffers: podKeepsSource, ternWant: ans(both, "c1")},
		{svc: "web", udp: true, from: fromPod, to: toClusterIP, needs: []feature{featClusterIP}, want: ans(both, "c1")},
		{svc: "web", udp: true, from: fromHost, to: toClusterIP, needs: []feature{featHostNet}, want: ans(both, "node-1")},
		{svc: "web", udp: true, from: fromExternal, to: toNodePort2, needs: []feature{featNodePort}, want: ans(both, "node-2"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-2")},

		// web-local: LoadBalancer, externalTrafficPolicy Local, its one backend (b2) on node-2;
		// its LoadBalancer IP is routed to node-1, which has no local endpoint.
		{svc: "web-local", from: fromExternal, to: toNodePort1, needs: []feature{featNodePort, featETPLocal}, want: outcome{Result: dropped}},
		{svc: "web-local", from: fromExternal, to: toNodePort2, needs: []feature{featNodePort, featETPLocal}, want: ans("b2", "external")},
		{svc: "web-local", from: fromExternal, to: toLB, needs: []feature{featLB, featETPLocal}, want: outcome{Result: dropped}},
		{svc: "web-local", from: fromPod, to: toClusterIP, needs: []feature{featClusterIP}, want: ans("b2", "c1")},
		{svc: "web-local", from: fromPod, to: toLB, needs: []feature{featLB, featETPLocal}, want: ans("b2", "c1")},
		{svc: "web-local", from: fromHost, to: toNodePort1, needs: []feature{featNodePort, featETPLocal, featHostNet}, want: ans("b2", "node-1")},
		// healthCheckNodePort: the cloud load balancer's probe; only node-2 has an endpoint.
		{svc: "web-local", from: fromExternal, to: toHealthCheck1, needs: []feature{featETPLocal},
			want: outcome{Result: "HTTP 503", Backends: "localEndpoints=0 serviceProxyHealthy=true"}},
		{svc: "web-local", from: fromExternal, to: toHealthCheck2, needs: []feature{featETPLocal},
			want: outcome{Result: "HTTP 200", Backends: "localEndpoints=1 serviceProxyHealthy=true"}},

		// itp-local: ClusterIP, internalTrafficPolicy Local, its one backend (b2) on node-2.
		{svc: "itp-local", from: fromPod, to: toClusterIP, needs: []feature{featITPLocal}, want: outcome{Result: dropped}},
		{svc: "itp-local", from: fromPodOther, to: toClusterIP, needs: []feature{featITPLocal}, want: ans("b2", "c2")},
		{svc: "itp-local", from: fromHost, to: toClusterIP, needs: []feature{featITPLocal, featHostNet}, want: outcome{Result: dropped}},

		// affinity: ClusterIP, sessionAffinity ClientIP, both backends.
		{svc: "affinity", from: fromPod, to: toClusterIP, needs: []feature{featAffinity}, want: ans(sticky, "c1")},
		{svc: "affinity", from: fromPodOther, to: toClusterIP, needs: []feature{featAffinity}, want: ans(sticky, "c2")},
		{svc: "affinity", from: fromHost, to: toClusterIP, needs: []feature{featAffinity, featHostNet}, want: ans(sticky, "node-1")},

		// Terminating endpoints (NodePort Services with hand-written EndpointSlices).
		{svc: "term-ready", from: fromPod, to: toClusterIP, needs: []feature{featTerminating}, want: ans("a1", "c1")},
		{svc: "term-only", from: fromPod, to: toClusterIP, needs: []feature{featTerminating}, want: ans("b2", "c1")},
		{svc: "term-only", from: fromExternal, to: toNodePort1, needs: []feature{featTerminating, featNodePort}, want: ans("b2", "node-1")},
		{svc: "term-gone", from: fromPod, to: toClusterIP, needs: []feature{featTerminating, featNoEndpoints}, want: outcome{Result: rejected}},
		{svc: "term-ready", from: fromHost, to: toClusterIP, needs: []feature{featTerminating, featHostNet}, want: ans("a1", "node-1")},
		{svc: "term-only", from: fromHost, to: toClusterIP, needs: []feature{featTerminating, featHostNet}, want: ans("b2", "node-1")},
		{svc: "term-gone", from: fromHost, to: toClusterIP, needs: []feature{featTerminating, featNoEndpoints, featHostNet}, want: outcome{Result: rejected}},

		// none: LoadBalancer with an externalIP whose selector matches no pod.
		{svc: "none", from: fromPod, to: toClusterIP, needs: []feature{featNoEndpoints}, want: outcome{Result: rejected}},
		{svc: "none", from: fromHost, to: toClusterIP, needs: []feature{featNoEndpoints, featHostNet}, want: outcome{Result: rejected}},
		{svc: "none", from: fromExternal, to: toNodePort1, needs: []feature{featNoEndpoints, featNodePort}, want: outcome{Result: rejected}},
		{svc: "none", from: fromExternal, to: toLB, needs: []feature{featNoEndpoints, featLB}, want: outcome{Result: rejected}},
		{svc: "none", from: fromExternal, to: toExternalIP, needs: []feature{featNoEndpoints, featExternalIP}, want: outcome{Result: rejected}},
		{svc: "none", udp: true, from: fromPod, to: toClusterIP, needs: []feature{featNoEndpoints}, want: outcome{Result: rejected}},
		{svc: "none", udp: true, from: fromHost, to: toClusterIP, needs: []feature{featNoEndpoints, featHostNet}, want: outcome{Result: rejected}},
		{svc: "none", udp: true, from: fromExternal, to: toNodePort1, needs: []feature{featNoEndpoints, featNodePort}, want: outcome{Result: rejected}},

		// loadBalancerSourceRanges: one Service allows the external client, one does not.
		{svc: "ranges-allow", from: fromExternal, to: toLB, needs: []feature{featLB, featRanges}, want: ans(both, "node-1"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-1")},
		{svc: "ranges-deny", from: fromExternal, to: toLB, needs: []feature{featLB, featRanges}, want: outcome{Result: dropped}},
		{svc: "ranges-deny", from: fromPod, to: toLB, needs: []feature{featLB, featRanges}, want: outcome{Result: dropped}},
		{svc: "ranges-deny", from: fromExternal, to: toNodePort1, needs: []feature{featNodePort, featRanges}, want: ans(both, "node-1"), ternDiffers: localKeepsClient, ternWant: ans(both, "external,node-1")},
		{svc: "ranges-deny", from: fromPod, to: toClusterIP, needs: []feature{featClusterIP}, want: ans(both, "c1")},
		// Host-network clients (tern: the socket hooks, which check the ranges against the
		// node's address; kube-proxy: its OUTPUT chain sees the node's address as source).
		{svc: "web", from: fromHost, to: toLB, needs: []feature{featLB, featHostNet}, want: ans(both, "node-1")},
		{svc: "ranges-allow", from: fromHost, to: toLB, needs: []feature{featLB, featRanges, featHostNet}, want: outcome{Result: dropped}},
		{svc: "ranges-deny", from: fromHost, to: toLB, needs: []feature{featLB, featRanges, featHostNet}, want: outcome{Result: dropped}},
		{svc: "ranges-deny", from: fromHostOther, to: toLB, needs: []feature{featLB, featRanges, featHostNet}, want: outcome{Result: dropped}},
		{svc: "ranges-deny", from: fromHost, to: toNodePort1, needs: []feature{featNodePort, featRanges, featHostNet}, want: ans(both, "node-1")},

		// hairpin: a1 reaches the Service only it backs and lands on itself.
		{svc: "hairpin", from: fromSelf, to: toClusterIP, needs: []feature{featHairpin}, want: ans("a1", "node-1"),
			ternDiffers: "tern masquerades hairpin traffic to its hairpin address 169.254.42.1 (as Cilium does), which it " +
				"routes back into the pod; kube-proxy masquerades to the node's address (docs/architecture.md, Hairpin)",
			ternWant: ans("a1", "169.254.42.1")},

		// deaf: UDP to a backend (a1, node-1) with no socket on the target port. Its port
		// unreachable quotes the translated packet; the client's socket, connected to the
		// frontend, hears it only if the proxy turns it back (kube-proxy's conntrack; tern:
		// bpf/lib/svcicmp.h, or no translation at all where the socket hooks connected it
		// to the backend). From outside: the local backend (node-1, DNAT only) and the
		// remote one (node-2, DNAT and SNAT to node-2).
		{svc: "deaf", udp: true, from: fromPod, to: toClusterIP, needs: []feature{featClusterIP}, want: outcome{Result: rejected}},
		{svc: "deaf", udp: true, from: fromPodOther, to: toClusterIP, needs: []feature{featClusterIP}, want: outcome{Result: rejected}},
		{svc: "deaf", udp: true, from: fromHost, to: toClusterIP, needs: []feature{featHostNet}, want: outcome{Result: rejected}},
		{svc: "deaf", udp: true, from: fromExternal, to: toNodePort1, needs: []feature{featNodePort}, want: outcome{Result: rejected}},
		{svc: "deaf", udp: true, from: fromExternal, to: toNodePort2, needs: []feature{featNodePort}, want: outcome{Result: rejected}},

		// hostPort is the CNI's (the portmap plugin in a kube-proxy cluster), not
		// kube-proxy's: the lab chains no portmap plugin, so there is no oracle yet.
		{svc: "hostport", from: fromExternal, to: toNodePort1, needs: []feature{featHostPort},
			noOracle: "hostPort is served by the CNI portmap plugin in a kube-proxy cluster, and the lab does not chain it"},
	}
}

// svcDef is one Service of the conformance setup.
type svcDef struct {
	name     string
	typ      corev1.ServiceType
	selector map[string]string // nil: no selector, the EndpointSlice is slice
	slice    []sliceEndpoint
	etpLocal bool
	itpLocal bool
	affinity bool
	lbIP     string
	extIP    string
	ranges   []string
	udp      bool // also a UDP port, 53 → udpBackendPort
	// udpTarget, when set, is the UDP port's target instead of udpBackendPort.
	udpTarget int32
}

type sliceEndpoint struct {
	pod                         string
	ready, serving, terminating bool
}

// LoadBalancer ingress IPs and externalIPs, from TEST-NET-3; the VPC routes them to node-1.
const (
	webLB          = "203.0.113.10"
	webExtIP       = "203.0.113.20"
	webLocalLB     = "203.0.113.11"
	noneLB         = "203.0.113.12"
	noneExtIP      = "203.0.113.22"
	rangesAllow    = "203.0.113.13"
	rangesDeny     = "203.0.113.14"
	confNS         = "conform"
	confPort       = 80
	backendPort    = 8080
	udpPort        = 53
	udpBackendPort = 5353
	deafPort       = 5999 // no pod listens there: the backend's kernel answers port unreachable
	canaryName     = "canary"
	maxTries       = 32 // P(a backend of two never chosen in 32 random tries) = 2^-31
	stickyTries    = 12
	answerBudget   = 3 * time.Second
	// dropTimeout is how long a connect may go unanswered before the case counts as
	// dropped. Every path in the lab is a few veth hops inside one kernel: an answer or a
	// rejection arrives within milliseconds (the slowest one seen is logged per run), and the
	// kernel's first SYN retransmission comes at 1 s, so 1.5 s also covers one lost SYN.
	dropTimeout = 1500 * time.Millisecond
)

func conformanceServices() []svcDef {
	web := map[string]string{"app": "web"}
	two := map[string]string{"side": "two"}
	return []svcDef{
		{name: "web", typ: corev1.ServiceTypeLoadBalancer, selector: web, lbIP: webLB, extIP: webExtIP, udp: true},
		{name: "web-local", typ: corev1.ServiceTypeLoadBalancer, selector: two, etpLocal: true, lbIP: webLocalLB},
		{name: "itp-local", typ: corev1.ServiceTypeClusterIP, selector: two, itpLocal: true},
		{name: "affinity", typ: corev1.ServiceTypeClusterIP, selector: web, affinity: true},
		{name: "term-ready", typ: corev1.ServiceTypeNodePort, slice: []sliceEndpoint{
			{pod: "a1", ready: true, serving: true}, {pod: "b2", serving: true, terminating: true}}},
		{name: "term-only", typ: corev1.ServiceTypeNodePort, slice: []sliceEndpoint{
			{pod: "b2", serving: true, terminating: true}}},
		{name: "term-gone", typ: corev1.ServiceTypeNodePort, slice: []sliceEndpoint{
			{pod: "b2", terminating: true}}},
		{name: "none", typ: corev1.ServiceTypeLoadBalancer, selector: map[string]string{"app": "nothing"}, lbIP: noneLB, extIP: noneExtIP, udp: true},
		{name: "ranges-allow", typ: corev1.ServiceTypeLoadBalancer, selector: web, lbIP: rangesAllow,
			ranges: []string{lab.ExternalClientIP + "/32"}},
		{name: "ranges-deny", typ: corev1.ServiceTypeLoadBalancer, selector: web, lbIP: rangesDeny,
			ranges: []string{"192.0.2.0/24"}},
		{name: "hairpin", typ: corev1.ServiceTypeClusterIP, selector: map[string]string{"solo": "a1"}},
		{name: "deaf", typ: corev1.ServiceTypeNodePort, selector: map[string]string{"solo": "a1"}, udp: true, udpTarget: deafPort},
	}
}

// confPod is one pod of the setup: name, node, labels, whether it serves backendPort.
type confPod struct {
	name, node string
	labels     map[string]string
	backend    bool
}

func confPods() []confPod {
	return []confPod{
		{"a1", "node-1", map[string]string{"app": "web", "solo": "a1"}, true},
		{"b2", "node-2", map[string]string{"app": "web", "side": "two"}, true},
		{"c1", "node-1", nil, false},
		{"c2", "node-2", nil, false},
	}
}

// proxyRun is one proxy under test.
type proxyRun struct {
	name string // kube-proxy-iptables, kube-proxy-nftables, tern
	mode string // kube-proxy's mode; "" for tern
}

// TestConformance runs the table against kube-proxy (iptables, nftables) and tern, each in a
// fresh lab, and compares. Run one proxy with -run 'TestConformance/tern'; the comparison
// then is with the table, which both kube-proxy modes are checked against in a full run.
func TestConformance(t *testing.T) {
	cases := conformanceCases()
	runs := []proxyRun{{"kube-proxy-iptables", "iptables"}, {"kube-proxy-nftables", "nftables"}, {"tern", ""}}
	results := map[string]map[string]outcome{}
	for _, r := range runs {
		t.Run(r.name, func(t *testing.T) {
			results[r.name] = runConformance(t, r, cases)
		})
	}
	t.Run("compare", func(t *testing.T) { compareConformance(t, cases, results) })
}

// compareConformance checks every proxy's outcomes: kube-proxy's against the table (the
// oracle must agree with what the table documents), tern's against kube-proxy's (or the
// table's when kube-proxy did not run), and logs one line per case.
func compareConformance(t *testing.T, cases []confCase, results map[string]map[string]outcome) {
	have := ternFeatures()
	var matched, differ, notCompared, noOracle int
	for _, c := range cases {
		n := c.name()
		if c.noOracle != "" {
			noOracle++
			t.Logf("NOT RUN      %-44s %s", n, c.noOracle)
			continue
		}
		oracle, oracleFrom := c.want, "the table"
		for _, kp := range []string{"kube-proxy-iptables", "kube-proxy-nftables"} {
			res, ok := results[kp]
			if !ok {
				continue
			}
			got, ran := res[n]
			if !ran {
				t.Errorf("%s: %s has no outcome", n, kp)
				continue
			}
			if got != c.want {
				t.Errorf("%s: %s gives %v, the table says %v: the table must describe kube-proxy", n, kp, got, c.want)
			}
			oracle, oracleFrom = got, kp
		}
		res, ok := results["tern"]
		if !ok {
			continue
		}
		if missing := missingFeatures(c, have); len(missing) > 0 {
			notCompared++
			t.Logf("NOT COMPARED %-44s tern lacks %v (kube-proxy: %v)", n, missing, oracle)
			continue
		}
		got, ran := res[n]
		switch {
		case !ran:
			t.Errorf("%s: tern has no outcome", n)
		case c.ternDiffers != "" && got == c.ternWant:
			differ++
			t.Logf("DIFFERS      %-44s tern %v, kube-proxy %v: %s", n, got, oracle, c.ternDiffers)
		case got == oracle:
			matched++
			t.Logf("MATCH        %-44s %v", n, got)
		default:
			t.Errorf("MISMATCH     %-44s tern %v, %s %v", n, got, oracleFrom, oracle)
		}
	}
	t.Logf("conformance: %d cases; tern: %d match, %d differ on purpose, %d not compared (feature not in tern yet), %d without an oracle",
		len(cases), matched, differ, notCompared, noOracle)
}

func missingFeatures(c confCase, have map[feature]bool) []feature {
	var out []feature
	for _, f := range c.needs {
		if !have[f] {
			out = append(out, f)
		}
	}
	return out
}

// confEnv is one proxy's lab with the conformance setup in place.
type confEnv struct {
	t      *testing.T
	l      *lab.Lab
	pods   map[string]*lab.Pod
	svcs   map[string]*corev1.Service
	ext    *lab.External
	hosts  [2]*sockclient.Client
	roles  map[netip.Addr]string // address → role name for Seen
	caFile string
}

// runConformance brings a lab up for one proxy, sets the Services up once and probes every
// case the proxy is meant to serve, one goroutine per source.
func runConformance(t *testing.T, r proxyRun, cases []confCase) map[string]outcome {
	opts := lab.Options{Nodes: 2}
	if r.mode != "" {
		opts.ExternalProxy = true
	} else {
		opts.SocketLB = true
	}
	before := rootProxyState(t)
	l := upKubernetes(t, opts)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e := &confEnv{t: t, l: l, pods: map[string]*lab.Pod{}, svcs: map[string]*corev1.Service{}, roles: map[netip.Addr]string{}}

	start := time.Now()
	if r.mode != "" {
		// Registered before the kube-proxies' clean-ups, so it runs after them: once every
		// kube-proxy stopped and cleaned up, nothing of it may have reached the root namespace.
		t.Cleanup(func() {
			if after := rootProxyState(t); after != before {
				t.Errorf("the root namespace's netfilter state changed during the kube-proxy run:\nbefore: %s\nafter:  %s", before, after)
			}
		})
		for _, n := range l.Nodes() {
			kp, err := l.StartKubeProxy(ctx, n, r.mode)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if t.Failed() {
					if b, err := os.ReadFile(kp.Log()); err == nil {
						if len(b) > 6000 {
							b = b[len(b)-6000:]
						}
						t.Logf("=== kube-proxy %s on %s (tail) ===\n%s", r.mode, n.Name, b)
					}
				}
				if err := kp.Stop(); err != nil {
					t.Error(err)
				}
				checkNoKubeProxyLeft(t, n)
			})
		}
	}
	e.setup(ctx)
	t.Logf("%s: lab, proxy and Services ready in %s", r.name, time.Since(start).Round(time.Millisecond))

	e.checkAPIServerThroughClusterIP(r)

	have := ternFeatures()
	bySource := map[source][]confCase{}
	for _, c := range cases {
		if c.noOracle != "" {
			continue
		}
		if r.mode == "" && len(missingFeatures(c, have)) > 0 {
			continue
		}
		bySource[c.from] = append(bySource[c.from], c)
	}
	out := map[string]outcome{}
	var mu sync.Mutex
	var slowest time.Duration
	var wg sync.WaitGroup
	probeStart := time.Now()
	for _, cs := range bySource {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, c := range cs {
				o, slow := e.probe(c)
				mu.Lock()
				out[c.name()] = o
				slowest = max(slowest, slow)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	names := make([]string, 0, len(out))
	for n := range out {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t.Logf("%-44s %v", n, out[n])
	}
	t.Logf("%s: %d cases probed in %s; slowest answered or rejected connect %s (drop timeout %s)",
		r.name, len(out), time.Since(probeStart).Round(time.Millisecond), slowest.Round(time.Microsecond), dropTimeout)
	return out
}

func (e *confEnv) setup(ctx context.Context) {
	t, l := e.t, e.l
	c := l.Client()
	if err := l.EnsureNamespace(ctx, confNS); err != nil {
		t.Fatal(err)
	}
	for _, ps := range confPods() {
		p, err := l.RunPod(ctx, lab.PodSpec{Namespace: confNS, Name: ps.name, Node: ps.node, Labels: ps.labels})
		if err != nil {
			t.Fatal(err)
		}
		e.pods[ps.name] = p
		e.roles[p.IP] = ps.name
		if ps.backend {
			serveWho(t, p, backendPort)
			serveWhoUDP(t, p, udpBackendPort)
		}
	}
	for _, n := range l.Nodes() {
		if err := nsutil.Do(n.NS, func() error {
			addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
			if err != nil {
				return err
			}
			for _, a := range addrs {
				ip, _ := netip.AddrFromSlice(a.IP.To4())
				if !ip.IsLoopback() {
					e.roles[ip] = n.Name
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		e.roles[netip.MustParseAddr(n.PrimaryIP)] = n.Name
	}
	ext, err := l.ExternalClient()
	if err != nil {
		t.Fatal(err)
	}
	e.ext = ext
	e.roles[ext.IP] = "external"
	for _, a := range []string{webLB, webExtIP, webLocalLB, noneLB, noneExtIP, rangesAllow, rangesDeny} {
		if err := l.RouteToNode(netip.MustParseAddr(a), l.Node(0)); err != nil {
			t.Fatal(err)
		}
	}

	for _, d := range conformanceServices() {
		e.svcs[d.name] = e.createService(ctx, d)
	}
	e.waitSlices(ctx)
	// The canary goes last: kube-proxy and tern each apply Service and EndpointSlice events
	// in the order the apiserver sent them, so once the canary answers on a node, that
	// node's proxy has applied everything created before it. This waits for programming
	// without ever probing a case (whose outcome is what is measured).
	canary, err := c.CoreV1().Services(confNS).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: canaryName},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Port: confPort, TargetPort: intstr.FromInt32(backendPort), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, client := range []*lab.Pod{e.pods["c1"], e.pods["c2"]} {
		addr := net.JoinHostPort(canary.Spec.ClusterIP, strconv.Itoa(confPort))
		deadline := time.Now().Add(60 * time.Second)
		for {
			_, _, err := dialWho(ctx, client.NS(), addr, time.Second)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the canary Service %s never answered pod %s on %s: %v", addr, client.Name, client.Node.Name, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for i, n := range l.Nodes() {
		e.hosts[i] = sockclient.Start(t, n.NS, n.Cgroup())
	}
	e.caFile = filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(e.caFile, l.RestConfig().CAData, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (e *confEnv) createService(ctx context.Context, d svcDef) *corev1.Service {
	t, c := e.t, e.l.Client()
	spec := corev1.ServiceSpec{Type: d.typ, Selector: d.selector, Ports: []corev1.ServicePort{
		{Name: "http", Port: confPort, TargetPort: intstr.FromInt32(backendPort), Protocol: corev1.ProtocolTCP}}}
	if d.udp {
		target := int32(udpBackendPort)
		if d.udpTarget != 0 {
			target = d.udpTarget
		}
		spec.Ports = append(spec.Ports, corev1.ServicePort{Name: "dns", Port: udpPort, TargetPort: intstr.FromInt32(target),
			Protocol: corev1.ProtocolUDP})
	}
	if d.etpLocal {
		spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	if d.itpLocal {
		spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	}
	if d.affinity {
		spec.SessionAffinity = corev1.ServiceAffinityClientIP
	}
	if d.extIP != "" {
		spec.ExternalIPs = []string{d.extIP}
	}
	spec.LoadBalancerSourceRanges = d.ranges
	svc, err := c.CoreV1().Services(confNS).Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: d.name}, Spec: spec},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create Service %s: %v", d.name, err)
	}
	if d.lbIP != "" {
		// No cloud controller runs in the lab: the test plays it.
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: d.lbIP}}
		if svc, err = c.CoreV1().Services(confNS).UpdateStatus(ctx, svc, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("set the LoadBalancer status of %s: %v", d.name, err)
		}
	}
	if d.selector == nil {
		eps := make([]discoveryv1.Endpoint, 0, len(d.slice))
		for _, se := range d.slice {
			p := e.pods[se.pod]
			eps = append(eps, discoveryv1.Endpoint{Addresses: []string{p.IP.String()}, NodeName: ptr.To(p.Node.Name),
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(se.ready), Serving: ptr.To(se.serving), Terminating: ptr.To(se.terminating)}})
		}
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: d.name, Labels: map[string]string{
				discoveryv1.LabelServiceName: d.name, discoveryv1.LabelManagedBy: "conformance.tern.invalid"}},
			AddressType: discoveryv1.AddressTypeIPv4, Endpoints: eps,
			Ports: []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To(int32(backendPort)), Protocol: ptr.To(corev1.ProtocolTCP)}},
		}
		if _, err := c.DiscoveryV1().EndpointSlices(confNS).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create the EndpointSlice of %s: %v", d.name, err)
		}
	}
	return svc
}

// waitSlices waits until the controller-manager's EndpointSlices of every selector Service
// hold exactly the ready pods the selector matches.
func (e *confEnv) waitSlices(ctx context.Context) {
	t, c := e.t, e.l.Client()
	deadline := time.Now().Add(60 * time.Second)
	for _, d := range conformanceServices() {
		if d.selector == nil {
			continue
		}
		var want []string
		for _, ps := range confPods() {
			if matches(d.selector, ps.labels) {
				want = append(want, e.pods[ps.name].IP.String())
			}
		}
		sort.Strings(want)
		for {
			list, err := c.DiscoveryV1().EndpointSlices(confNS).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + d.name})
			if err != nil && !apierrors.IsNotFound(err) {
				t.Fatal(err)
			}
			var got []string
			if list != nil {
				for _, s := range list.Items {
					for _, ep := range s.Endpoints {
						if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
							got = append(got, ep.Addresses...)
						}
					}
				}
			}
			sort.Strings(got)
			if slices.Equal(got, want) && list != nil && len(list.Items) > 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("EndpointSlices of %s hold %v, want %v", d.name, got, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func matches(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// addr is the address:port case c dials.
func (e *confEnv) addr(c confCase) (string, error) {
	svc, ok := e.svcs[c.svc]
	if !ok {
		return "", fmt.Errorf("no Service %q in the setup", c.svc)
	}
	sp := svc.Spec.Ports[0]
	if c.udp {
		i := slices.IndexFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Protocol == corev1.ProtocolUDP })
		if i < 0 {
			return "", fmt.Errorf("Service %s has no UDP port", c.svc)
		}
		sp = svc.Spec.Ports[i]
	}
	port := int(sp.Port)
	var host string
	switch c.to {
	case toClusterIP:
		host = svc.Spec.ClusterIP
	case toNodePort1, toNodePort2:
		port = int(sp.NodePort)
		host = e.l.Node(0).PrimaryIP
		if c.to == toNodePort2 {
			host = e.l.Node(1).PrimaryIP
		}
		if port == 0 {
			return "", fmt.Errorf("Service %s has no NodePort", c.svc)
		}
	case toLB:
		if len(svc.Status.LoadBalancer.Ingress) == 0 {
			return "", fmt.Errorf("Service %s has no LoadBalancer IP", c.svc)
		}
		host = svc.Status.LoadBalancer.Ingress[0].IP
	case toHealthCheck1, toHealthCheck2:
		port = int(svc.Spec.HealthCheckNodePort)
		host = e.l.Node(0).PrimaryIP
		if c.to == toHealthCheck2 {
			host = e.l.Node(1).PrimaryIP
		}
		if port == 0 {
			return "", fmt.Errorf("Service %s has no healthCheckNodePort", c.svc)
		}
	case toExternalIP:
		if len(svc.Spec.ExternalIPs) == 0 {
			return "", fmt.Errorf("Service %s has no externalIP", c.svc)
		}
		host = svc.Spec.ExternalIPs[0]
	}
	return net.JoinHostPort(host, strconv.Itoa(port)), nil
}

// try is one connection's result.
type try struct {
	result    string // answered, rejected, dropped, or "error: ..."
	who, seen string
	took      time.Duration
}

// connect makes one connection from the case's source.
func (e *confEnv) connect(c confCase, addr string) try {
	start := time.Now()
	switch c.from {
	case fromHost, fromHostOther:
		h := e.hosts[0]
		if c.from == fromHostOther {
			h = e.hosts[1]
		}
		cmd := fmt.Sprintf("tcpt %s %d", addr, dropTimeout.Milliseconds())
		if c.udp {
			// A connected UDP socket: an ICMP port unreachable fails its read with
			// ECONNREFUSED. (Its wait is sockclient's 3 s; no UDP case from a host drops.)
			cmd = "udpconn " + addr
		}
		a := h.Do(cmd)
		took := time.Since(start)
		switch {
		case a.Err == "":
			return try{result: answered, who: a.Who, seen: a.Seen, took: took}
		case isReject(syscall.Errno(a.Errno)):
			return try{result: rejected, took: took}
		case syscall.Errno(a.Errno) == syscall.ETIMEDOUT || strings.Contains(a.Err, "timeout"):
			return try{result: dropped, took: took}
		default:
			return try{result: "error: " + a.Err, took: took}
		}
	}
	ns := e.ext.NS()
	switch c.from {
	case fromPod:
		ns = e.pods["c1"].NS()
	case fromPodOther:
		ns = e.pods["c2"].NS()
	case fromSelf:
		ns = e.pods["a1"].NS()
	}
	dial := dialWho
	if c.udp {
		dial = askWhoUDP
	}
	who, seen, err := dial(context.Background(), ns, addr, dropTimeout)
	took := time.Since(start)
	var ne net.Error
	var en syscall.Errno
	switch {
	case err == nil:
		return try{result: answered, who: who, seen: seen, took: took}
	case errors.As(err, &en) && isReject(en):
		return try{result: rejected, took: took}
	case errors.As(err, &en) && en == syscall.ETIMEDOUT, errors.As(err, &ne) && ne.Timeout():
		return try{result: dropped, took: took}
	default:
		return try{result: "error: " + err.Error(), took: took}
	}
}

// isReject: the client was told at once. ECONNREFUSED is a RST or an ICMP port unreachable
// (or tern's socket hook refusing); EHOST/ENETUNREACH an ICMP unreachable; EPERM is what a
// host-network process's send gets when netfilter rejects its packet in OUTPUT (kube-proxy's
// REJECT of UDP to a Service without endpoints).
func isReject(en syscall.Errno) bool {
	return en == syscall.ECONNREFUSED || en == syscall.EHOSTUNREACH || en == syscall.ENETUNREACH || en == syscall.EPERM
}

// probe runs one case: a drop or a rejection ends it at once; answers are collected until
// both backends have answered or maxTries (stickyTries for affinity) connections were made.
// It returns the outcome and the slowest answered or rejected connect.
func (e *confEnv) probe(c confCase) (outcome, time.Duration) {
	addr, err := e.addr(c)
	if err != nil {
		return outcome{Result: "error: " + err.Error()}, 0
	}
	if c.to == toHealthCheck1 || c.to == toHealthCheck2 {
		return e.healthCheck(c, addr)
	}
	tries := maxTries
	isSticky := slices.Contains(c.needs, featAffinity)
	if isSticky {
		tries = stickyTries
	}
	backends, seen := map[string]bool{}, map[string]bool{}
	var slowest time.Duration
	for i := range tries {
		r := e.connect(c, addr)
		if r.result != dropped {
			slowest = max(slowest, r.took)
		}
		if r.result != answered {
			if i > 0 {
				// Answers and then something else: report it as it is.
				return outcome{Result: fmt.Sprintf("%s after %d answers by {%s}", r.result, i, joinKeys(backends))}, slowest
			}
			return outcome{Result: r.result}, slowest
		}
		backends[r.who] = true
		seen[e.role(r.seen)] = true
		if !isSticky && len(backends) == 2 {
			break
		}
	}
	o := outcome{Result: answered, Backends: joinKeys(backends), Seen: joinKeys(seen)}
	if isSticky && len(backends) == 1 {
		o.Backends = sticky
	}
	return o, slowest
}

// healthCheck GETs a healthCheckNodePort from the external client, as a cloud load
// balancer's probe does: the outcome is the status and the JSON's localEndpoints and
// serviceProxyHealthy (kube-proxy's answer: {"service":{...},"localEndpoints":N,
// "serviceProxyHealthy":B}).
func (e *confEnv) healthCheck(c confCase, addr string) (outcome, time.Duration) {
	start := time.Now()
	var conn net.Conn
	if err := e.ext.Exec(func() (err error) {
		conn, err = (&net.Dialer{Timeout: dropTimeout}).Dial("tcp4", addr)
		return err
	}); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return outcome{Result: dropped}, 0
		}
		var en syscall.Errno
		if errors.As(err, &en) && isReject(en) {
			return outcome{Result: rejected}, time.Since(start)
		}
		return outcome{Result: "error: " + err.Error()}, 0
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(answerBudget))
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return outcome{Result: "error: " + err.Error()}, 0
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return outcome{Result: "error: " + err.Error()}, 0
	}
	defer resp.Body.Close()
	var body struct {
		LocalEndpoints      *int  `json:"localEndpoints"`
		ServiceProxyHealthy *bool `json:"serviceProxyHealthy"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || body.LocalEndpoints == nil || body.ServiceProxyHealthy == nil {
		return outcome{Result: fmt.Sprintf("HTTP %d", resp.StatusCode), Backends: fmt.Sprintf("unexpected body (%v)", err)}, time.Since(start)
	}
	return outcome{Result: fmt.Sprintf("HTTP %d", resp.StatusCode),
		Backends: fmt.Sprintf("localEndpoints=%d serviceProxyHealthy=%t", *body.LocalEndpoints, *body.ServiceProxyHealthy)}, time.Since(start)
}

// role names an address a backend saw.
func (e *confEnv) role(hostport string) string {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		host = hostport
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return "?" + hostport
	}
	if r, ok := e.roles[a]; ok {
		return r
	}
	return a.String()
}

func joinKeys(m map[string]bool) string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, ",")
}

// askWhoUDP sends one datagram from a connected UDP socket inside ns and reads
// serveWhoUDP's answer within timeout; an ICMP port unreachable fails the read with
// ECONNREFUSED.
func askWhoUDP(ctx context.Context, ns netns.NsHandle, addr string, timeout time.Duration) (who, seen string, err error) {
	var c net.Conn
	if err := nsutil.Do(ns, func() (err error) {
		c, err = (&net.Dialer{}).DialContext(ctx, "udp4", addr)
		return err
	}); err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("who")); err != nil {
		return "", "", err
	}
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return "", "", err
	}
	f := strings.Fields(string(buf[:n]))
	if len(f) != 2 {
		return "", "", fmt.Errorf("answer of %s is %q, want \"<pod> <client address>\"", addr, buf[:n])
	}
	return f[0], f[1], nil
}

// dialWho connects from inside ns to addr within timeout and reads serveWho's line.
func dialWho(ctx context.Context, ns netns.NsHandle, addr string, timeout time.Duration) (who, seen string, err error) {
	var c net.Conn
	err = nsutil.Do(ns, func() (err error) {
		c, err = (&net.Dialer{Timeout: timeout}).DialContext(ctx, "tcp4", addr)
		return err
	})
	if err != nil {
		return "", "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(answerBudget))
	buf := make([]byte, 256)
	n, err := c.Read(buf)
	if err != nil {
		return "", "", fmt.Errorf("read the answer of %s: %w", addr, err)
	}
	f := strings.Fields(string(buf[:n]))
	if len(f) != 2 {
		return "", "", fmt.Errorf("answer of %s is %q, want \"<pod> <client address>\"", addr, buf[:n])
	}
	return f[0], f[1], nil
}

// checkAPIServerThroughClusterIP: pods and host-network processes on every node reach the
// apiserver through the `kubernetes` Service's ClusterIP (its endpoint is lab.APIServerAddr),
// with the lab's CA verifying the certificate for the ClusterIP: GET /version.
func (e *confEnv) checkAPIServerThroughClusterIP(r proxyRun) {
	t := e.t
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	svc, err := e.l.Client().CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort(svc.Spec.ClusterIP, strconv.Itoa(int(svc.Spec.Ports[0].Port)))
	check := func(who string, a sockclient.Answer) {
		t.Helper()
		if a.Err != "" || a.Who != "200" || !strings.Contains(a.Seen, `"gitVersion"`) {
			t.Errorf("%s: GET https://%s/version (the kubernetes Service, endpoint %s): %+v", who, addr, e.l.APIServerEndpoint(), a)
			return
		}
		t.Logf("%s reached the apiserver through %s: %.60s", who, addr, a.Seen)
	}
	for i, n := range e.l.Nodes() {
		check("host-network process on "+n.Name, e.hosts[i].Do(fmt.Sprintf("httpsget %s %s /version", addr, e.caFile)))
	}
	// A pod has no process of its own here: a client process in the pod's namespace (and
	// in no socket-LB cgroup, as a pod's containers are not) stands in for it.
	for _, name := range []string{"c1", "c2"} {
		p := e.pods[name]
		c := sockclient.Start(t, p.NS(), "")
		check("pod "+name+" on "+p.Node.Name, c.Do(fmt.Sprintf("httpsget %s %s /version", addr, e.caFile)))
	}
}

// rootProxyState is the root namespace's netfilter state kube-proxy could touch: the
// nftables tables and the iptables chains named KUBE-*. The kube-proxy runs must leave it as
// they found it.
func rootProxyState(t *testing.T) string {
	t.Helper()
	var parts []string
	if out, err := exec.Command("nft", "list", "tables").CombinedOutput(); err == nil {
		parts = append(parts, strings.Join(strings.Fields(string(out)), " "))
	} else {
		t.Fatalf("nft list tables in the root namespace: %v: %s", err, out)
	}
	if out, err := exec.Command("iptables-save").CombinedOutput(); err == nil {
		var kube []string
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "KUBE-") {
				kube = append(kube, line)
			}
		}
		parts = append(parts, fmt.Sprintf("%d iptables lines naming KUBE-", len(kube)))
	} else {
		t.Fatalf("iptables-save in the root namespace: %v: %s", err, out)
	}
	return strings.Join(parts, "; ")
}

// checkNoKubeProxyLeft: after kube-proxy --cleanup the node namespace holds no kube-proxy
// nftables table and no KUBE-* iptables chain, so the next proxy finds a clean node.
func checkNoKubeProxyLeft(t *testing.T, n *lab.Node) {
	t.Helper()
	ctx := context.Background()
	out, err := n.RunInNode(ctx, "nft", "list", "tables")
	if err != nil {
		t.Errorf("nft list tables on %s: %v: %s", n.Name, err, out)
	} else if strings.Contains(out, "kube-proxy") {
		t.Errorf("%s still has a kube-proxy table after kube-proxy --cleanup: %s", n.Name, out)
	}
	out, err = n.RunInNode(ctx, "iptables-save")
	if err != nil {
		t.Errorf("iptables-save on %s: %v: %s", n.Name, err, out)
	} else if strings.Contains(out, "KUBE-SERVICES") || strings.Contains(out, "KUBE-SVC-") {
		t.Errorf("%s still has kube-proxy iptables rules after kube-proxy --cleanup", n.Name)
	}
}

// conformanceDocRow is a case's row in docs/conformance.md's table.
func conformanceDocRow(c confCase, have map[feature]bool) string {
	needs := make([]string, len(c.needs))
	for i, f := range c.needs {
		needs[i] = string(f)
	}
	kp, tern := c.want.String(), "compared"
	switch {
	case c.noOracle != "":
		kp, tern = "not run (no oracle)", "not run"
	case len(missingFeatures(c, have)) > 0:
		tern = "not compared yet"
	case c.ternDiffers != "":
		tern = "differs on purpose: " + c.ternWant.String()
	}
	return fmt.Sprintf("| `%s` | %s | %s | %s | %s | %s |", c.svc, c.from, c.dest(), strings.Join(needs, ", "), kp, tern)
}

// TestConformanceDocumented: docs/conformance.md lists every case of the table as it is
// (outcome, features, whether tern is compared), so the document cannot drift from the suite.
func TestConformanceDocumented(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "docs", "conformance.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	have := ternFeatures()
	var rows []string
	missing := 0
	for _, c := range conformanceCases() {
		row := conformanceDocRow(c, have)
		rows = append(rows, row)
		if !strings.Contains(doc, row) {
			missing++
			t.Errorf("docs/conformance.md lacks the row\n%s", row)
		}
	}
	if missing > 0 {
		t.Logf("the table as the suite has it:\n%s", strings.Join(rows, "\n"))
	}
}
