package e2e

import (
	"errors"
	"fmt"
	"slices"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/tern-net/tern/internal/nsutil"
	"github.com/tern-net/tern/internal/testutil"
	"github.com/tern-net/tern/loader"
	"github.com/tern-net/tern/loader/loadertest"
	"github.com/tern-net/tern/service"
	"github.com/tern-net/tern/service/lbmap"
)

// TestAttachModeFollowsKernel attaches without ForceClsact and checks that AttachPod picked
// tcx where the kernel has it and fell back to clsact by itself where it has not, that the
// programs sit where the returned mode says, and that Service traffic flows over them. The
// expectation comes from the kernel's own BTF, not from the loader's probe, so the test
// means something on both kinds of kernel; test/vmkernel runs it on one without tcx.
func TestAttachModeFollowsKernel(t *testing.T) {
	testutil.RequirePrivileged(t)
	want := loader.AttachClsact
	if kernelHasTCX(t) {
		want = loader.AttachTCX
	}
	t.Logf("kernel BTF says tcx is %s: expecting AttachPod to choose %s",
		map[bool]string{true: "present", false: "absent"}[want == loader.AttachTCX], want)

	lab := newNodeLab(t)
	client := lab.addPod("client", "10.0.1.10")
	b1 := lab.addPod("b1", "10.0.1.21")
	b2 := lab.addPod("b2", "10.0.1.22")
	b1.serve(t, 8080)
	b2.serve(t, 8080)

	d := loadertest.New(t, loader.Config{})
	fromID, toID := progID(t, d.FromPod()), progID(t, d.ToPod())
	err := nsutil.Do(lab.node, func() error {
		for _, p := range lab.pods {
			mode, err := d.AttachPod(p.ifindex)
			if err != nil {
				return fmt.Errorf("attach to %s: %w", p.hostIf, err)
			}
			if mode != want {
				return fmt.Errorf("AttachPod on %s chose %s, want %s", p.hostIf, mode, want)
			}
			if err := checkAttached(p.ifindex, want, fromID, toID); err != nil {
				return fmt.Errorf("%s: %w", p.hostIf, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	r, err := lbmap.NewReconciler(d.Maps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	web := service.Frontend{Addr: vip, Port: 80, Proto: service.TCP}
	webUDP := service.Frontend{Addr: vip, Port: 80, Proto: service.UDP}
	empty := service.Frontend{Addr: emptyVIP, Port: 80, Proto: service.TCP}
	both := []service.Backend{{Addr: b1.ip, Port: 8080}, {Addr: b2.ip, Port: 8080}}
	desired := service.State{web: both, webUDP: both, empty: {}}
	if err := r.Apply(desired.Lookup, []service.Frontend{web, webUDP, empty}); err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for i := 0; i < 12; i++ {
		c, who, err := client.dialTCP("10.96.0.10:80")
		if err != nil {
			t.Fatalf("connection %d through the VIP over %s: %v", i, want, err)
		}
		if err := c.echo("ping"); err != nil {
			t.Fatal(err)
		}
		c.c.Close()
		seen[who]++
	}
	if seen["b1"] == 0 || seen["b2"] == 0 {
		t.Fatalf("TCP through the VIP over %s did not reach both backends: %v", want, seen)
	}
	who, from, err := client.udpAsk("10.96.0.10:80")
	if err != nil || from.Addr() != vip {
		t.Fatalf("UDP through the VIP over %s: %v (answer from %s)", want, err, from)
	}
	if _, _, err := client.dialTCP("10.96.0.11:80"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("service without endpoints over %s: %v, want connection refused", want, err)
	}
	t.Logf("over %s: 12 TCP connections through the VIP reached b1 %d, b2 %d; UDP answered by %s from the VIP; no endpoints refused",
		want, seen["b1"], seen["b2"], who)
}

// kernelHasTCX reads the running kernel's BTF: tcx attach types exist in enum
// bpf_attach_type exactly on kernels that implement them (6.6 and later, or backports).
func kernelHasTCX(t *testing.T) bool {
	t.Helper()
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		testutil.SkipOrFail(t, fmt.Sprintf("kernel BTF unavailable, cannot tell whether tcx exists: %v", err))
	}
	var attach *btf.Enum
	if err := spec.TypeByName("bpf_attach_type", &attach); err != nil {
		t.Fatalf("find enum bpf_attach_type in kernel BTF: %v", err)
	}
	return slices.ContainsFunc(attach.Values, func(v btf.EnumValue) bool { return v.Name == "BPF_TCX_INGRESS" })
}

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("kernel does not report program IDs")
	}
	return id
}

// checkAttached asks the kernel what runs on ifindex in each direction: exactly our
// program through the mechanism mode names, and nothing through the other one. Run it in
// the interface's namespace.
func checkAttached(ifindex int, mode loader.AttachMode, fromID, toID ebpf.ProgramID) error {
	for _, dir := range []struct {
		name   string
		want   ebpf.ProgramID
		tcx    ebpf.AttachType
		parent uint32
	}{
		{"ingress", fromID, ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS},
		{"egress", toID, ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS},
	} {
		var tcxIDs []ebpf.ProgramID
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: dir.tcx})
		switch {
		case err == nil:
			for _, p := range res.Programs {
				tcxIDs = append(tcxIDs, p.ID)
			}
		case mode == loader.AttachTCX:
			return fmt.Errorf("query tcx %s programs: %w", dir.name, err)
		}
		// Without clsact on the device there are no filters to list; that reads as none.
		var clsIDs []ebpf.ProgramID
		lk, err := netlink.LinkByIndex(ifindex)
		if err != nil {
			return err
		}
		filters, err := netlink.FilterList(lk, dir.parent)
		if err != nil && mode == loader.AttachClsact {
			return fmt.Errorf("list clsact %s filters: %w", dir.name, err)
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				clsIDs = append(clsIDs, ebpf.ProgramID(bf.Id))
			}
		}
		got, other := tcxIDs, clsIDs
		if mode == loader.AttachClsact {
			got, other = clsIDs, tcxIDs
		}
		if !slices.Equal(got, []ebpf.ProgramID{dir.want}) || len(other) != 0 {
			return fmt.Errorf("%s: tcx runs programs %v and clsact %v; want only program %d through %s",
				dir.name, tcxIDs, clsIDs, dir.want, mode)
		}
	}
	return nil
}
