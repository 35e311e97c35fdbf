package api

import "testing"

func TestHostVethNameFitsAndIsStable(t *testing.T) {
	a := HostVethName("0123456789abcdef0123456789abcdef", "eth0")
	if len(a) > 15 || a[:4] != "tern" {
		t.Fatalf("%q: want tern + hex within IFNAMSIZ-1", a)
	}
	if HostVethName("0123456789abcdef0123456789abcdef", "") != a {
		t.Error("empty ifName should mean eth0")
	}
	if HostVethName("0123456789abcdef0123456789abcdef", "net1") == a || HostVethName("other", "eth0") == a {
		t.Error("different attachments share a host veth name")
	}
}
