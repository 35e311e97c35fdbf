package loader

import (
	"strings"
	"testing"
)

func TestProbeForwardingModes(t *testing.T) {
	if _, _, err := probeForwarding("fast"); err == nil || !strings.Contains(err.Error(), `forwarding mode "fast"`) {
		t.Fatalf("unknown mode: %v", err)
	}
	got, missing, err := probeForwarding(ForwardStack)
	if err != nil || got != (ForwardSupport{}) || len(missing) != 0 {
		t.Fatalf("stack: %+v %v %v, want nothing redirected and nothing probed", got, missing, err)
	}
	if got.bits() != 0 || (ForwardSupport{Peer: true, Neigh: true}).bits() != fwdCfgPeer|fwdCfgNeigh {
		t.Fatal("CFG_FORWARD bits do not follow ForwardSupport")
	}
}
