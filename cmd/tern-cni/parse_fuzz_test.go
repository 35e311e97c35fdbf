package main

import (
	"reflect"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/tern-net/tern/agent/api"
)

// FuzzParseConf checks the network configuration parser: no panic, and an accepted config
// has timeouts the plugin can use (a zero or negative one would fail every call at once with
// a deadline error that does not name the config).
func FuzzParseConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"tern","type":"tern-cni","socket":"/run/tern/agent.sock","mtu":1500,"timeout":"5s","eniLinkTimeout":"2s"}`))
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"tern","type":"tern-cni","cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}`))
	f.Add([]byte(`{"timeout":"-1s"}`))
	f.Add([]byte(`{"timeout":"0"}`))
	f.Add([]byte(`{"eniLinkTimeout":"1e400h"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := parseConf(b)
		c2, err2 := parseConf(b)
		if (err == nil) != (err2 == nil) || (err == nil && !reflect.DeepEqual(c, c2)) {
			t.Fatalf("parseConf is not deterministic on %q", b)
		}
		if err != nil {
			return
		}
		if c.timeout <= 0 || c.eniTimeout <= 0 {
			t.Fatalf("accepted timeouts %v and %v from %q", c.timeout, c.eniTimeout, b)
		}
		if c.Socket == "" {
			t.Fatalf("accepted an empty socket path from %q", b)
		}
	})
}

// FuzzPodRef checks CNI_ARGS parsing: no panic, and an accepted reference is one the agent
// accepts too (the same validation on both sides of the socket).
func FuzzPodRef(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u", "abc", "eth0")
	f.Add("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b", "x", "")
	f.Add("K8S_POD_NAMESPACE=A;K8S_POD_NAME=b;;=;x", "-x", "eth0")
	f.Add("IgnoreUnknown=0;Foo=bar", "c", "eth0")
	f.Fuzz(func(t *testing.T, args, containerID, ifName string) {
		ref, err := podRef(&skel.CmdArgs{Args: args, ContainerID: containerID, IfName: ifName})
		if err != nil {
			return
		}
		if verr := api.ValidatePodRef(ref); verr != nil {
			t.Fatalf("podRef accepted %+v from %q, which the agent refuses: %v", ref, args, verr)
		}
		if ref.ContainerID != containerID || ref.IfName != ifName {
			t.Fatalf("podRef changed the sandbox: %+v from %q/%q", ref, containerID, ifName)
		}
	})
}
