package loader_test

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/tern-net/tern/internal/packet"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

func TestCollectorExportsDatapathCounters(t *testing.T) {
	d := loadertest.New(t, loader.Config{})
	loadertest.PutService(t, d.Maps(), 1, "10.96.0.10", 80, packet.ProtoTCP, loadertest.B("10.0.2.21", 8080))
	for i := 0; i < 3; i++ {
		loadertest.Run(t, d.FromPod(), tcp(client, uint16(40000+i), vip, 80, packet.SYN).Build())
	}
	loadertest.Run(t, d.FromNetdev(), tcp(be1, 8080, client, 40000, packet.SYN|packet.ACK).Build())
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(loader.NewCollector(d.Maps()))
	want := `
# HELP tern_datapath_packets_total Packets the datapath programs (pod veths, ENIs and the primary NIC) acted on, by reason (drops are reasons starting with drop_) and direction.
# TYPE tern_datapath_packets_total counter
tern_datapath_packets_total{direction="from-netdev",reason="pass"} 1
tern_datapath_packets_total{direction="from-pod",reason="svc_forward"} 3
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "tern_datapath_packets_total"); err != nil {
		t.Fatal(err)
	}
}
