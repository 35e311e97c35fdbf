package loader_test

import (
	"fmt"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
)

// BenchmarkAttachPod measures attaching both pod programs to a fresh veth, with tcx and with
// clsact: it is on the path of every pod creation.
func BenchmarkAttachPod(b *testing.B) {
	for _, mode := range []struct {
		name   string
		clsact bool
	}{{"tcx", false}, {"clsact", true}} {
		b.Run(mode.name, func(b *testing.B) {
			d := loadertest.New(b, loader.Config{ForceClsact: mode.clsact})
			ns := testutil.NewNetNS(b)
			err := nsutil.Do(ns, func() error {
				for i := 0; b.Loop(); i++ {
					b.StopTimer()
					attrs := netlink.NewLinkAttrs()
					attrs.Name = fmt.Sprintf("v%d", i)
					if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: fmt.Sprintf("p%d", i)}); err != nil {
						return err
					}
					l, err := netlink.LinkByName(attrs.Name)
					if err != nil {
						return err
					}
					b.StartTimer()
					if _, err := d.AttachPod(l.Attrs().Index); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}
