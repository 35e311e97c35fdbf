package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// TestNetdevProgramsPassAndCount attaches the netdev programs to a veth standing in for an
// ENI link (its far end, "vpc", is a namespace playing a VPC host) and sends TCP and UDP
// from a pod namespace across it: the traffic must pass, tern_to_netdev must count what
// leaves through the ENI and tern_from_netdev what comes back, and after DetachNetdev the
// traffic still passes and the counters stand still. ReattachPods (an agent restart) must
// leave the ENI alone. Both attach modes.
func TestNetdevProgramsPassAndCount(t *testing.T) {
	for _, mode := range []loader.AttachMode{loader.AttachTCX, loader.AttachClsact} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == loader.AttachTCX && !kernelHasTCX(t) {
				t.Skip("kernel has no tcx; the clsact case covers the fallback")
			}
			lab := newNodeLab(t)
			client := lab.addPod("client", "10.0.1.10")
			vpc := lab.addPod("vpc", "10.0.1.99")
			vpc.serve(t, 8080)

			d := loadertest.New(t, loader.Config{ForceClsact: mode == loader.AttachClsact})
			m := d.Maps()
			var attached bool
			err := nsutil.Do(lab.node, func() error {
				got, err := d.AttachNetdev(vpc.ifindex)
				if err != nil {
					return err
				}
				if got != mode {
					return fmt.Errorf("AttachNetdev chose %s, want %s", got, mode)
				}
				attached = d.NetdevAttached(vpc.ifindex)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !attached {
				t.Fatalf("NetdevAttached(%d) is false right after AttachNetdev", vpc.ifindex)
			}
			if mode == loader.AttachTCX {
				for _, dir := range []string{"ingress", "egress"} {
					pin := filepath.Join(d.Config().PinRoot, "links", fmt.Sprintf("netdev_if%d_%s", vpc.ifindex, dir))
					if _, err := os.Stat(pin); err != nil {
						t.Fatalf("tcx link pin: %v", err)
					}
				}
			}

			// An agent restart re-attaches pod programs to every interface with tern pins or
			// filters; the ENI must not be mistaken for a pod veth.
			err = nsutil.Do(lab.node, func() error {
				ifs, err := d.ReattachPods()
				if err != nil {
					return err
				}
				if slices.Contains(ifs, vpc.ifindex) {
					return fmt.Errorf("ReattachPods put pod programs on the ENI stand-in (ifindex %d): %v", vpc.ifindex, ifs)
				}
				if !d.NetdevAttached(vpc.ifindex) {
					return fmt.Errorf("netdev programs gone from ifindex %d after ReattachPods", vpc.ifindex)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}

			const rounds = 5
			exchange := func() {
				t.Helper()
				for i := 0; i < rounds; i++ {
					c, who, err := client.dialTCP("10.0.1.99:8080")
					if err != nil {
						t.Fatalf("TCP %d across the ENI: %v", i, err)
					}
					if who != "vpc" {
						t.Fatalf("TCP %d answered by %q, want vpc", i, who)
					}
					if err := c.echo("ping"); err != nil {
						t.Fatalf("TCP %d echo across the ENI: %v", i, err)
					}
					c.c.Close()
					if who, _, err := client.udpAsk("10.0.1.99:8080"); err != nil || who != "vpc" {
						t.Fatalf("UDP %d across the ENI: %q, %v", i, who, err)
					}
				}
			}
			count := func(dir loader.Direction) uint64 {
				return loadertest.Metric(t, m, loader.ReasonPass, dir)
			}
			exchange()
			out, in := count(loader.DirToNetdev), count(loader.DirFromNetdev)
			// Each round is at least SYN, ACK, data, FIN out and one datagram out, and as
			// many back.
			if out < 4*rounds || in < 4*rounds {
				t.Fatalf("after %d TCP connections and UDP exchanges: to-netdev %d, from-netdev %d packets; want at least %d each",
					rounds, out, in, 4*rounds)
			}
			for _, dir := range []loader.Direction{loader.DirFromPod, loader.DirToPod} {
				if n := count(dir); n != 0 {
					t.Fatalf("%s counted %d packets with no pod programs attached", dir, n)
				}
			}

			err = nsutil.Do(lab.node, func() error {
				if err := d.DetachNetdev(vpc.ifindex); err != nil {
					return err
				}
				attached = d.NetdevAttached(vpc.ifindex)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if attached {
				t.Fatalf("NetdevAttached(%d) is still true after DetachNetdev", vpc.ifindex)
			}
			// Read once the programs are off: the closed connections' last segments may
			// still have been crossing the ENI when exchange returned.
			out, in = count(loader.DirToNetdev), count(loader.DirFromNetdev)
			exchange()
			if o, i := count(loader.DirToNetdev), count(loader.DirFromNetdev); o != out || i != in {
				t.Fatalf("counters moved after DetachNetdev: to-netdev %d -> %d, from-netdev %d -> %d", out, o, in, i)
			}
			t.Logf("%s: %d packets out and %d in counted across the ENI stand-in", mode, out, in)
		})
	}
}
