//go:build linux

package e2e

import (
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/datapath"
	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// TestTrunkVLANProgramsRunBeforeNetdev: on a link that carries both, the trunk programs run
// before the netdev programs, in the clsact fallback (kernels without tcx: Debian's 6.1) as
// with tcx. The link is the node side of a veth standing in for the trunk ENI; its far end
// ("vpc") tags and untags with a second pair of trunk programs, as the VPC does. A UDP
// exchange between a member pod (VLAN 5) and the far end succeeds only if the node tags what
// leaves and untags what arrives; the netdev programs end their chain (TC_ACT_OK), so their
// counting the same packets shows they ran after the VLAN programs, not instead of them. In
// clsact mode a netdev filter left at the priority older agents used (1) is removed by
// AttachNetdev, and the trunk's own filter at that priority stays.
func TestTrunkVLANProgramsRunBeforeNetdev(t *testing.T) {
	for _, mode := range []loader.AttachMode{loader.AttachTCX, loader.AttachClsact} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == loader.AttachTCX && !kernelHasTCX(t) {
				t.Skip("kernel has no tcx; the clsact case covers the fallback")
			}
			const vlan = 5
			lab := newNodeLab(t)
			member := lab.addPod("member", "10.0.1.10")
			vpc := lab.addPod("vpc", "10.0.1.99")
			vpc.serve(t, 8080)

			d := loadertest.New(t, loader.Config{ForceClsact: mode == loader.AttachClsact})
			node, err := datapath.LoadTrunk("")
			if err != nil {
				t.Fatal(err)
			}
			defer node.Close()
			far, err := datapath.LoadTrunk("")
			if err != nil {
				t.Fatal(err)
			}
			defer far.Close()
			node.SetAttachMode(mode)
			far.SetAttachMode(mode)

			err = nsutil.Do(lab.node, func() error {
				if mode == loader.AttachClsact {
					// What an older agent left: the netdev program at priority 1, handle 1.
					if _, err := d.AttachNetdev(vpc.ifindex); err != nil {
						return err
					}
					if err := netlink.FilterReplace(&netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: vpc.ifindex,
						Parent: netlink.HANDLE_MIN_EGRESS, Handle: 1, Priority: 1, Protocol: 0x0003},
						Fd: d.ToNetdev().FD(), Name: loader.NetdevProgTernToNetdev, DirectAction: true}); err != nil {
						return fmt.Errorf("install a legacy netdev filter: %w", err)
					}
				}
				// The trunk programs go on first (as on an ENI whose netdev programs are
				// there already, or come later: the order of calls does not matter).
				if err := node.Attach(vpc.ifindex); err != nil {
					return err
				}
				if _, err := d.AttachNetdev(vpc.ifindex); err != nil {
					return err
				}
				return node.AddPod(member.ip, vpc.ifindex, vlan)
			})
			if err != nil {
				t.Fatal(err)
			}
			err = nsutil.Do(vpc.ns, func() error {
				eth, err := netlink.LinkByName("eth0")
				if err != nil {
					return err
				}
				if err := far.Attach(eth.Attrs().Index); err != nil {
					return err
				}
				return far.AddPod(vpc.ip, eth.Attrs().Index, vlan)
			})
			if err != nil {
				t.Fatal(err)
			}
			if mode == loader.AttachClsact {
				checkClsactOrder(t, lab, vpc.ifindex)
			}

			for i := range 3 {
				if who, _, err := member.udpAsk("10.0.1.99:8080"); err != nil || who != "vpc" {
					t.Fatalf("UDP %d from the member pod across the trunk: %q, %v", i, who, err)
				}
			}
			st, err := node.Stats()
			if err != nil {
				t.Fatal(err)
			}
			fst, err := far.Stats()
			if err != nil {
				t.Fatal(err)
			}
			out := loadertest.Metric(t, d.Maps(), loader.ReasonPass, loader.DirToNetdev)
			in := loadertest.Metric(t, d.Maps(), loader.ReasonPass, loader.DirFromNetdev)
			if st.Tagged < 3 || st.Untagged < 3 || fst.Untagged < 3 || fst.Tagged < 3 || out < 3 || in < 3 {
				t.Fatalf("node trunk %+v, far trunk %+v, netdev out %d in %d: want every program to have seen the 3 datagrams each way", st, fst, out, in)
			}
			if st.DropUnknownVLAN+st.DropWrongDst+st.DropPush != 0 {
				t.Fatalf("node trunk dropped: %+v", st)
			}
			t.Logf("%s: node trunk %+v, netdev out %d in %d", mode, st, out, in)

			// Detach takes the trunk programs off and leaves the netdev ones: the member's
			// datagrams then leave untagged and the far end's tagged answers are not taken.
			if err := nsutil.Do(lab.node, func() error { return node.Detach(vpc.ifindex) }); err != nil {
				t.Fatal(err)
			}
			if who, _, err := member.udpAsk("10.0.1.99:8080"); err == nil {
				t.Fatalf("the member pod got an answer (%q) with the trunk programs detached", who)
			}
			if err := nsutil.Do(lab.node, func() error {
				if !d.NetdevAttached(vpc.ifindex) {
					return fmt.Errorf("netdev programs gone from ifindex %d with the trunk's", vpc.ifindex)
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// checkClsactOrder: on the link, each direction has the trunk program at priority 1 and the
// netdev program at priority 2, and nothing else (the legacy netdev filter is gone).
func checkClsactOrder(t *testing.T, lab *nodeLab, ifindex int) {
	t.Helper()
	err := nsutil.Do(lab.node, func() error {
		lk := &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}
		for _, c := range []struct {
			parent         uint32
			trunk, netdevP string
		}{{netlink.HANDLE_MIN_EGRESS, "tern_trunk_egress", loader.NetdevProgTernToNetdev},
			{netlink.HANDLE_MIN_INGRESS, "tern_trunk_ingress", loader.NetdevProgTernFromNetdev}} {
			fs, err := netlink.FilterList(lk, c.parent)
			if err != nil {
				return err
			}
			got := map[string]uint16{}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					if _, dup := got[bf.Name]; dup {
						return fmt.Errorf("two filters named %s on ifindex %d", bf.Name, ifindex)
					}
					got[bf.Name] = bf.Priority
				}
			}
			if len(got) != 2 || got[c.trunk] != loader.TrunkClsactPriority || got[c.netdevP] != loader.NetdevClsactPriority {
				return fmt.Errorf("clsact filters on ifindex %d: %v, want %s at %d and %s at %d", ifindex, got,
					c.trunk, loader.TrunkClsactPriority, c.netdevP, loader.NetdevClsactPriority)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
