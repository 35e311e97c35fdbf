// Package progrun runs a BPF program once with BPF_PROG_TEST_RUN for the benchmarks, returning
// both the output frame and the kernel's own duration of the run.
package progrun

import (
	"fmt"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// testRunAttr is the BPF_PROG_TEST_RUN part of union bpf_attr (include/uapi/linux/bpf.h).
type testRunAttr struct {
	progFD      uint32
	retval      uint32
	dataSizeIn  uint32
	dataSizeOut uint32
	dataIn      uint64
	dataOut     uint64
	repeat      uint32
	duration    uint32
	ctxSizeIn   uint32
	ctxSizeOut  uint32
	ctxIn       uint64
	ctxOut      uint64
	flags       uint32
	cpu         uint32
	batchSize   uint32
	_           uint32
}

// Run runs prog once on a fresh skb holding in, and returns the verdict, the packet as
// the program left it (in out's storage) and the kernel's own duration of the run in ns.
// cilium/ebpf gives either the output (Run) or the duration (Benchmark), not both, and a
// benchmark must check what every measured run did.
func Run(prog *ebpf.Program, in, out []byte) (verdict uint32, result []byte, ns uint32, err error) {
	return RunWithContext(prog, in, out, nil)
}

// RunWithContext is Run with a context for the program (for tc programs a struct __sk_buff
// whose settable fields the kernel copies into the skb, such as ingress_ifindex); nil: none.
func RunWithContext(prog *ebpf.Program, in, out, ctx []byte) (verdict uint32, result []byte, ns uint32, err error) {
	attr := testRunAttr{
		progFD:      uint32(prog.FD()),
		dataSizeIn:  uint32(len(in)),
		dataSizeOut: uint32(len(out)),
		dataIn:      uint64(uintptr(unsafe.Pointer(unsafe.SliceData(in)))),
		dataOut:     uint64(uintptr(unsafe.Pointer(unsafe.SliceData(out)))),
		repeat:      1,
	}
	if ctx != nil {
		attr.ctxSizeIn = uint32(len(ctx))
		attr.ctxIn = uint64(uintptr(unsafe.Pointer(unsafe.SliceData(ctx))))
	}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(in)
	runtime.KeepAlive(out)
	runtime.KeepAlive(ctx)
	// With one repetition a kernel since 5.10 checks for signals only after the run is
	// complete and never returns EINTR; on any error the kernel copies nothing out.
	if errno != 0 {
		return 0, nil, 0, fmt.Errorf("BPF_PROG_TEST_RUN of %s with a %d-byte frame: %w", prog, len(in), errno)
	}
	if int(attr.dataSizeOut) > len(out) {
		return 0, nil, 0, fmt.Errorf("BPF_PROG_TEST_RUN of %s: output of %d bytes exceeds the %d-byte buffer", prog, attr.dataSizeOut, len(out))
	}
	return attr.retval, out[:attr.dataSizeOut], attr.duration, nil
}
