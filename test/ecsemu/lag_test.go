package ecsemu

import (
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/aliyun/alibaba-cloud-sdk-go/sdk/requests"
	"github.com/aliyun/alibaba-cloud-sdk-go/services/ecs"
)

// fakeClock is a settable clock for the emulator.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func listedIPs(t *testing.T, c *ecs.Client, id string) []string {
	t.Helper()
	var out []string
	for _, s := range describeENI(t, c, id).PrivateIpSets.PrivateIpSet {
		if !s.Primary {
			out = append(out, s.PrivateIpAddress)
		}
	}
	slices.Sort(out)
	return out
}

func TestListingLagsBehindAssignUnassignAndStatus(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	cfg := TestConfig()
	cfg.ListingLag = ListingLag{Assigned: Duration(500 * time.Millisecond), Unassigned: Duration(time.Second), Status: Duration(300 * time.Millisecond)}
	emu, addr := NewTestServer(t, cfg, WithClock(clock.Now))
	c, _ := NewTestClients(t, addr)

	// The create reply carries the new addresses; the listing shows them 500 ms later.
	req := ecs.CreateCreateNetworkInterfaceRequest()
	req.VSwitchId, req.SecurityGroupId, req.ClientToken = "vsw-test-a", "sg-test", "tok-create"
	req.SecondaryPrivateIpAddressCount = requests.NewInteger(2)
	created, err := c.CreateNetworkInterface(req)
	must(t, err)
	id := created.NetworkInterfaceId
	if len(created.PrivateIpSets.PrivateIpSet) != 3 {
		t.Fatalf("create reply lists %d addresses, want the primary and 2", len(created.PrivateIpSets.PrivateIpSet))
	}
	if got := listedIPs(t, c, id); len(got) != 0 {
		t.Fatalf("right after the create the listing shows %v; want none yet", got)
	}
	clock.Advance(500 * time.Millisecond)
	if got := listedIPs(t, c, id); len(got) != 2 {
		t.Fatalf("500 ms after the create the listing shows %v; want 2 addresses", got)
	}

	// An assign: the reply has the addresses, the listing does not yet; the same token
	// returns the same addresses (idempotent), as does the same create token.
	a1, err := assignN(c, id, 3, "tok-assign")
	must(t, err)
	got := a1.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress
	if len(got) != 3 || len(listedIPs(t, c, id)) != 2 {
		t.Fatalf("assign reply %v, listing %v; want 3 new, 2 listed", got, listedIPs(t, c, id))
	}
	a2, err := assignN(c, id, 3, "tok-assign")
	must(t, err)
	if !slices.Equal(a2.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress, got) {
		t.Fatalf("the same ClientToken assigned %v, then %v", got, a2.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress)
	}
	again, err := c.CreateNetworkInterface(req)
	must(t, err)
	if again.NetworkInterfaceId != id || len(again.PrivateIpSets.PrivateIpSet) != 3 {
		t.Fatalf("the same create token returned %s with %d addresses; want %s with its first 3", again.NetworkInterfaceId, len(again.PrivateIpSets.PrivateIpSet), id)
	}
	clock.Advance(500 * time.Millisecond)
	if n := len(listedIPs(t, c, id)); n != 5 {
		t.Fatalf("listing shows %d secondary addresses after the lag, want 5", n)
	}

	// An unassign: gone at once in truth, still listed for 1 s.
	ureq := ecs.CreateUnassignPrivateIpAddressesRequest()
	ureq.NetworkInterfaceId = id
	ureq.PrivateIpAddress = &[]string{got[0]}
	_, err = c.UnassignPrivateIpAddresses(ureq)
	must(t, err)
	if st, _ := emu.Snapshot().ENI(id); slices.Contains(st.IPs, got[0]) {
		t.Fatalf("%s still assigned after the unassign", got[0])
	}
	if !slices.Contains(listedIPs(t, c, id), got[0]) {
		t.Fatalf("%s vanished from the listing at once; want it listed for 1 s", got[0])
	}
	clock.Advance(time.Second)
	if slices.Contains(listedIPs(t, c, id), got[0]) {
		t.Fatalf("%s still listed 1 s after the unassign", got[0])
	}

	// Status: attaching shows as Available for 300 ms.
	must(t, attach(t, c, "i-test-0001", id))
	if s := describeENI(t, c, id).Status; s != StatusAvailable {
		t.Fatalf("right after the attach the listing says %s; want the old Available", s)
	}
	clock.Advance(300 * time.Millisecond)
	if s := describeENI(t, c, id).Status; s != StatusInUse {
		t.Fatalf("300 ms after the attach the listing says %s; want InUse", s)
	}
	if _, err := netip.ParseAddr(got[0]); err != nil {
		t.Fatal(err)
	}
}

func TestHoldReplyLosesTheReplyButKeepsTheEffect(t *testing.T) {
	emu, addr := NewTestServer(t, TestConfig())
	c, _ := NewTestClients(t, addr)
	id := createENI(t, c, "vsw-test-a", map[string]string{"tern.io/node": "n1"}).NetworkInterfaceId
	other := createENI(t, c, "vsw-test-a", map[string]string{"tern.io/node": "n2"}).NetworkInterfaceId

	held, release := emu.HoldReply("AssignPrivateIpAddresses", func(h HeldCall) bool { return h.Tags["tern.io/node"] == "n1" })
	defer release()
	// A call the hold does not match answers normally.
	_, err := assignN(c, other, 1, "tok-other")
	must(t, err)

	req := ecs.CreateAssignPrivateIpAddressesRequest()
	req.NetworkInterfaceId = id
	req.SecondaryPrivateIpAddressCount = requests.NewInteger(2)
	req.ClientToken = "tok-held"
	req.SetReadTimeout(300 * time.Millisecond) // the client gives up: the reply is lost
	_, err = c.AssignPrivateIpAddresses(req)
	if err == nil {
		t.Fatal("the held call answered")
	}
	select {
	case h := <-held:
		if h.ENIID != id || h.Action != "AssignPrivateIpAddresses" {
			t.Fatalf("held %+v, want the assign to %s", h, id)
		}
	default:
		t.Fatal("the hold did not report the call")
	}
	st, _ := emu.Snapshot().ENI(id)
	if len(st.IPs) != 3 {
		t.Fatalf("ENI has %v after the lost reply; want the assign applied (3 addresses)", st.IPs)
	}
	// The replay with the same token answers with exactly those addresses and assigns none.
	r, err := assignN(c, id, 2, "tok-held")
	must(t, err)
	if got := r.AssignedPrivateIpAddressesSet.PrivateIpSet.PrivateIpAddress; !slices.Equal(got, st.IPs[1:]) {
		t.Fatalf("replay returned %v, want %v", got, st.IPs[1:])
	}
	if st2, _ := emu.Snapshot().ENI(id); len(st2.IPs) != 3 {
		t.Fatalf("replay changed the ENI to %v", st2.IPs)
	}
}

// TestAddressMovesBetweenENIsAfterTheReassignLag moves one address from one ENI to another by
// name, as a fixed pod IP does when its pod changes node: while the old ENI's unassign is
// still settling (ListingLag.Reassign) the assign by name is refused with the documented
// InvalidPrivateIpAddress.Duplicated and the address stays in the old ENI's listing; after
// the lag the same assign succeeds. Malformed and out-of-vSwitch addresses get their own codes.
func TestAddressMovesBetweenENIsAfterTheReassignLag(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	cfg := TestConfig()
	cfg.ListingLag = ListingLag{Unassigned: Duration(time.Second), Reassign: Duration(2 * time.Second)}
	_, addr := NewTestServer(t, cfg, WithClock(clock.Now))
	c, _ := NewTestClients(t, addr)
	from := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	to := createENI(t, c, "vsw-test-a", nil).NetworkInterfaceId
	byName := func(eni string, ips ...string) error {
		req := ecs.CreateAssignPrivateIpAddressesRequest()
		req.NetworkInterfaceId = eni
		req.PrivateIpAddress = &ips
		_, err := c.AssignPrivateIpAddresses(req)
		return err
	}
	const ip = "192.168.1.100"
	must(t, byName(from, ip))
	wantCode(t, byName(to, ip), CodeIPAddressAlreadyUsed) // held by the other ENI
	un := ecs.CreateUnassignPrivateIpAddressesRequest()
	un.NetworkInterfaceId = from
	un.PrivateIpAddress = &[]string{ip}
	_, err := c.UnassignPrivateIpAddresses(un)
	must(t, err)
	wantCode(t, byName(to, ip), CodeIPAddressAlreadyUsed) // still being released
	if got := listedIPs(t, c, from); !slices.Contains(got, ip) {
		t.Fatalf("right after the unassign the old ENI lists %v; want %s still there", got, ip)
	}
	clock.Advance(2 * time.Second)
	must(t, byName(to, ip))
	if got := listedIPs(t, c, from); slices.Contains(got, ip) {
		t.Fatalf("2s after the unassign the old ENI still lists %s: %v", ip, got)
	}
	wantCode(t, byName(to, "192.168.1.300"), CodeIPMalformed)
	wantCode(t, byName(to, "10.9.9.9"), CodeIPNotInVSwitch)
}
