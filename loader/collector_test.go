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
# HELP tern_datapath_packets_total Packets the datapath programs (pod veths, ENIs and the primary NIC) acted on, by reason (drops are reasons starting with drop_) and direction; for direction sock, calls of the socket-LB hooks.
# TYPE tern_datapath_packets_total counter
tern_datapath_packets_total{direction="from-netdev",reason="pass"} 1
tern_datapath_packets_total{direction="from-pod",reason="svc_forward"} 3
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "tern_datapath_packets_total"); err != nil {
		t.Fatal(err)
	}
}

// Map pressure: the entries the datapath and the reconciler wrote are counted, batched for
// the hash maps and entry by entry for the LPM trie, against each map's size.
func TestCollectorExportsMapPressure(t *testing.T) {
	d := loadertest.New(t, loader.Config{MaxFlows: 16384})
	m := d.Maps()
	loadertest.PutService(t, m, 1, "10.96.0.10", 80, packet.ProtoTCP, loadertest.B("10.0.2.21", 8080))
	// 5000 service flows (two entries each, more than one batch) and 10 plain ones.
	for i := 0; i < 5000; i++ {
		loadertest.Run(t, d.FromPod(), tcp(client, uint16(20000+i), vip, 80, packet.SYN).Build())
	}
	for i := 0; i < 10; i++ {
		loadertest.Run(t, d.FromPod(), tcp(client, uint16(1000+i), be2, 80, packet.SYN).Build())
	}
	if err := m.IPCache.Put(loader.IPCacheKey{Prefixlen: 24, Addr: loader.AddrToBE(be2)}, loader.IPCacheValue{Identity: 3}); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(loader.NewCollector(m))
	want := `
# HELP tern_datapath_map_entries Entries in a datapath map, counted at scrape time (conntrack at capacity means LRU eviction of idle flows).
# TYPE tern_datapath_map_entries gauge
tern_datapath_map_entries{map="tern_backends"} 1
tern_datapath_map_entries{map="tern_conntrack"} 10010
tern_datapath_map_entries{map="tern_endpoints"} 0
tern_datapath_map_entries{map="tern_ipcache"} 1
tern_datapath_map_entries{map="tern_lb_members"} 1
tern_datapath_map_entries{map="tern_services"} 1
tern_datapath_map_entries{map="tern_snat"} 0
# HELP tern_datapath_map_capacity The size a datapath map was created with.
# TYPE tern_datapath_map_capacity gauge
tern_datapath_map_capacity{map="tern_backends"} 524288
tern_datapath_map_capacity{map="tern_conntrack"} 16384
tern_datapath_map_capacity{map="tern_endpoints"} 4096
tern_datapath_map_capacity{map="tern_ipcache"} 65536
tern_datapath_map_capacity{map="tern_lb_members"} 524288
tern_datapath_map_capacity{map="tern_services"} 131072
tern_datapath_map_capacity{map="tern_snat"} 131072
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "tern_datapath_map_entries", "tern_datapath_map_capacity"); err != nil {
		t.Fatal(err)
	}
}
