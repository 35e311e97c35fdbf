//go:build linux

package main

import "testing"

func TestParseHello(t *testing.T) {
	h, ok := parseHello("hello from api-0 on node-1 (192.168.16.7), client 198.51.100.10")
	if !ok || h != (hello{pod: "api-0", node: "node-1", client: "198.51.100.10"}) {
		t.Fatalf("got %+v %v", h, ok)
	}
	if _, ok := parseHello("hello from api-0 on node-1 (192.168.16.7)"); ok {
		t.Fatal("an answer without the client parsed")
	}
}
