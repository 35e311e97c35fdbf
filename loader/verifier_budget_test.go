package loader

import (
	_ "embed"
	"encoding/json"
	"regexp"
	"sort"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tern-net/tern/internal/testutil"
)

// verifierBudgetFile holds, per program and kernel ("6.1", "6.18", or "*" for any other),
// the most instructions the verifier may process when loading it: what docs/reliability.md
// records for the kernels we test, plus headroom (about 15 % for the pod programs). The
// count depends on the kernel (6.1 explores twice the states 6.18 does), hence per kernel.
// Embedded, so the test binary carries it into the qemu kernels (test/vmkernel).
const verifierBudgetFile = "testdata/verifier-budget.json"

//go:embed testdata/verifier-budget.json
var verifierBudgetJSON []byte

var kernelMajorMinor = regexp.MustCompile(`^\d+\.\d+`)

var processedInsns = regexp.MustCompile(`processed (\d+) insns \(limit \d+\) max_states_per_insn (\d+) total_states (\d+) peak_states (\d+)`)

// TestVerifierBudget loads every BPF program with the verifier's statistics and fails when
// one makes the verifier process more instructions than its budget: a program that grows
// towards the 1M-instruction limit (or the complexity that older kernels refuse) shows up
// here as a diff to review, not as a load failure on some node. It logs the counts, which
// the qemu kernel runs (test/vmkernel) print for their kernels.
func TestVerifierBudget(t *testing.T) {
	testutil.RequirePrivileged(t)
	var budget map[string]map[string]int
	if err := json.Unmarshal(verifierBudgetJSON, &budget); err != nil {
		t.Fatalf("%s: %v", verifierBudgetFile, err)
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	kernel := unix.ByteSliceToString(uts.Release[:])
	majorMinor := kernelMajorMinor.FindString(kernel)

	cfg := Config{}
	cfg.setDefaults()
	fwd, _, err := probeForwarding(cfg.Forwarding)
	if err != nil {
		t.Fatal(err)
	}
	pod, _, _, err := podSpec(cfg, fwd)
	if err != nil {
		t.Fatal(err)
	}
	netdev, err := LoadNetdev()
	if err != nil {
		t.Fatal(err)
	}
	noop, err := LoadNoop()
	if err != nil {
		t.Fatal(err)
	}
	sock, err := LoadSock()
	if err != nil {
		t.Fatal(err)
	}
	// The socket hooks load on every kernel with cgroup sock_addr hooks; the UDP destroy
	// iterator only where bpf_sock_destroy exists (6.5+, loaded on its own by LoadSockFor
	// and tested by test/e2e TestSocketLB), so it is left out here.
	delete(sock.Programs, SockProgTernSockDestroyUdp)
	seen := map[string]bool{SockProgTernSockDestroyUdp: true}
	for _, spec := range []*ebpf.CollectionSpec{pod, netdev, noop, sock} {
		// Unpinned maps: the budget is about the programs, and the test leaves nothing behind.
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
			Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats}})
		if err != nil {
			t.Fatalf("load with verifier statistics: %v", err)
		}
		names := make([]string, 0, len(coll.Programs))
		for name := range coll.Programs {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			seen[name] = true
			m := processedInsns.FindStringSubmatch(coll.Programs[name].VerifierLog)
			if m == nil {
				t.Errorf("%s: no statistics in the verifier log %q", name, coll.Programs[name].VerifierLog)
				continue
			}
			n, _ := strconv.Atoi(m[1])
			t.Logf("verifier: kernel %s program %s processed %d insns, max_states_per_insn %s, total_states %s, peak_states %s",
				kernel, name, n, m[2], m[3], m[4])
			limit, ok := budget[name][majorMinor]
			if !ok {
				limit, ok = budget[name]["*"]
			}
			switch {
			case !ok:
				t.Errorf("%s has no budget in %s: add one (its count on this kernel, %d, plus headroom) and record the counts in docs/reliability.md",
					name, verifierBudgetFile, n)
			case n > limit:
				t.Errorf("%s: the verifier processed %d instructions on kernel %s, over its budget of %d (%s): "+
					"simplify the program, or raise the budget in the same change and record why in docs/reliability.md",
					name, n, kernel, limit, verifierBudgetFile)
			}
		}
		coll.Close()
	}
	for name := range budget {
		if !seen[name] {
			t.Errorf("%s has a budget in %s but no program of that name exists: remove it", name, verifierBudgetFile)
		}
	}
}
