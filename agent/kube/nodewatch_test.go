package kube

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/tern-net/tern/internal/testutil"
)

// newNetns makes an anonymous network namespace (gone with its last handle) without moving
// the test's threads into it.
func newNetns(t *testing.T) netns.NsHandle {
	t.Helper()
	var ns netns.NsHandle
	errc := make(chan error)
	go func() {
		// Never unlocked: the thread ends in the new namespace and dies with the goroutine.
		runtime.LockOSThread()
		var err error
		ns, err = netns.New()
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// changes collects what an addrWatch reports.
type changes struct {
	mu  sync.Mutex
	got [][]netip.Addr
}

func (c *changes) add(a []netip.Addr) { c.mu.Lock(); c.got = append(c.got, a); c.mu.Unlock() }

func (c *changes) waitFor(t *testing.T, want []netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.got)
		var last []netip.Addr
		if n > 0 {
			last = c.got[n-1]
		}
		c.mu.Unlock()
		if n > 0 && slices.Equal(last, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no address change to %v within 10s (reports: %v)", want, c.got)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAddrWatchFollowsNetlinkEvents: in a namespace of its own, an address added to a link
// and then removed is reported at once, from the netlink event (the periodic check is an
// hour away).
func TestAddrWatchFollowsNetlinkEvents(t *testing.T) {
	testutil.RequirePrivileged(t)
	ns := newNetns(t)
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	la := netlink.NewLinkAttrs()
	la.Name = "nw0"
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "nw1"}); err != nil {
		t.Fatal(err)
	}
	link, err := h.LinkByName("nw0")
	if err != nil {
		t.Fatal(err)
	}
	// What the agent reads: the link's global IPv4 addresses.
	read := func() []netip.Addr {
		as, err := h.AddrList(link, netlink.FAMILY_V4)
		if err != nil {
			t.Errorf("list addresses: %v", err)
			return nil
		}
		var out []netip.Addr
		for _, a := range as {
			if x, ok := netip.AddrFromSlice(a.IP.To4()); ok && x.IsGlobalUnicast() {
				out = append(out, x)
			}
		}
		return out
	}
	var c changes
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		addrWatch{ns: ns, interval: time.Hour, read: read, onChange: c.add, log: zaptest.NewLogger(t)}.run(ctx, nil)
	}()
	defer func() { cancel(); <-done }()

	first := netip.MustParseAddr("192.0.2.10")
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: first.AsSlice(), Mask: net.CIDRMask(24, 32)}}
	deadline := time.Now().Add(10 * time.Second)
	if err := h.AddrAdd(link, addr); err != nil {
		t.Fatal(err)
	}
	for {
		c.mu.Lock()
		n := len(c.got)
		c.mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		// The watch may have subscribed after the add: until it reports, add and remove a
		// second address, each an event that makes it read the addresses again.
		second := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(198, 51, 100, 1), Mask: net.CIDRMask(32, 32)}}
		if err := h.AddrAdd(link, second); err != nil {
			t.Fatal(err)
		}
		if err := h.AddrDel(link, second); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.waitFor(t, []netip.Addr{first})

	if err := h.AddrDel(link, addr); err != nil {
		t.Fatal(err)
	}
	c.waitFor(t, nil)
}

// TestAddrWatchPeriodicCheck: without any netlink event (a namespace where nothing
// changes), a change in what read returns is found by the periodic check.
func TestAddrWatchPeriodicCheck(t *testing.T) {
	var mu sync.Mutex
	cur := []netip.Addr{netip.MustParseAddr("192.0.2.1")}
	read := func() []netip.Addr { mu.Lock(); defer mu.Unlock(); return slices.Clone(cur) }
	var c changes
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	initial := read()
	go func() {
		defer close(done)
		// The caller's namespace: its events (if any) only cause extra reads.
		addrWatch{ns: netns.None(), interval: 20 * time.Millisecond, read: read, onChange: c.add, log: zaptest.NewLogger(t)}.run(ctx, initial)
	}()
	defer func() { cancel(); <-done }()
	mu.Lock()
	cur = append(cur, netip.MustParseAddr("192.0.2.2"))
	mu.Unlock()
	c.waitFor(t, []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")})
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.got) != 1 {
		t.Errorf("reports %v, want exactly one (the unchanged list is not reported)", c.got)
	}
}
