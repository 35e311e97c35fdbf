#!/usr/bin/env bash
# Runs tern's datapath tests on a second kernel: Debian's linux-image-amd64 (6.1, which has
# no tcx, so AttachPod must fall back to clsact by itself) booted under qemu with TCG.
#
# The kernel is never installed on the host: its .deb is downloaded and unpacked into the
# cache, a bootable ELF vmlinux is extracted from the bzImage (PVH boot through qboot is
# twice as fast as a bzImage through SeaBIOS), and an initramfs is built from busybox-static,
# the modules the tests need (load order resolved from modinfo depends=) and
# `CGO_ENABLED=0 go test -c` binaries. The guest runs them with TERN_PRIVILEGED=1, so a skip
# is a failure, and this script exits with their status.
#
# Environment (all optional):
#   TERN_VMKERNEL_PKG      kernel package or meta package (default linux-image-amd64, 6.1;
#                          linux-image-6.12-amd64 boots a kernel with tcx)
#   TERN_VMKERNEL_CACHE    cache directory (default /var/cache/tern/vmkernel)
#   TERN_VMKERNEL_TIMEOUT  seconds before qemu is killed (default 1200)
#   TERN_VMKERNEL_MEM      guest memory in MiB (default 512)
#   TERN_VMKERNEL_LOADER   go test flags for ./loader  (empty string: do not run)
#   TERN_VMKERNEL_E2E      go test flags for ./test/e2e (empty string: do not run)
#   TERN_VMKERNEL_BW_RATES the two limits TestBandwidthLimitsPods measures (default 5M,10M:
#                          TCG carried 27-440 Mbit/s unlimited, by host load, and
#                          the unlimited pod must beat 1.5x the higher limit)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache=${TERN_VMKERNEL_CACHE:-/var/cache/tern/vmkernel}
timeout_s=${TERN_VMKERNEL_TIMEOUT:-1200}
mem=${TERN_VMKERNEL_MEM:-512}
GO=${GO:-go}
# bpftool is not in the guest; everything else in ./loader runs there.
loader_flags=${TERN_VMKERNEL_LOADER-"-test.skip ^TestBpftoolPrettyPrintsMaps\$"}
e2e_flags=${TERN_VMKERNEL_E2E-"-test.run ^(TestAttachModeFollowsKernel|TestClusterIPEndToEnd|TestNetdevProgramsPassAndCount|TestForwardRedirectPeer|TestForwardStackMode|TestForwardOutOfENI|TestSocketLB|TestSocketLBServiceFeatures|TestBandwidthLimitsPods|TestTrunkProbeFollowsKernel|TestTrunkVLANProgramsRunBeforeNetdev|TestNodePortFromAnExternalClient|TestICMPErrorsOfServiceFlowsReachTheClient)\$"}
# The bandwidth test there must run in EDT mode (both kernels have fq), at rates TCG can carry.
bw_rates=${TERN_VMKERNEL_BW_RATES:-5M,10M}
# The guest's own test timeout fires first, so a hang still prints its goroutine dump.
test_timeout=$((timeout_s > 90 ? timeout_s - 30 : timeout_s * 2 / 3))
common_flags="-test.v -test.count=1 -test.timeout=${test_timeout}s"
# Modules the tests need when the kernel builds them as modules: veth pairs, clsact
# (sch_ingress) with cls_bpf/act_bpf, xfrm_user + nfnetlink, without which
# netlink.NewHandleAt fails with "protocol not supported", and fq for EDT pacing.
modules="veth sch_ingress cls_bpf act_bpf xfrm_user nfnetlink sch_fq"

log() { echo "vmkernel: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (apt-get, and the cache under $cache)"

# --- host packages (idempotent) -------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
need=()
for p in qemu-system-x86 busybox-static cpio xz-utils kmod; do
	installed "$p" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
	log "installing ${need[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
qboot=/usr/share/qemu/qboot.rom # shipped by qemu-system-data
[ -f "$qboot" ] || die "$qboot missing (it comes with qemu-system-data)"

# --- kernel, vmlinux and the module/busybox part of the initramfs (cached) -------------
# A meta package (linux-image-amd64, linux-image-6.12-amd64) names the current kernel.
want=${TERN_VMKERNEL_PKG:-linux-image-amd64}
pkg=$(apt-cache depends "$want" 2>/dev/null |
	awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
pkg=${pkg:-$want}
version=$(apt-cache show "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
[ -n "$version" ] || die "apt knows no version of $pkg (run apt-get update?)"
kdir=$cache/${pkg}_$version
mkdir -p "$kdir"

tmp=$(mktemp -d /tmp/tern-vmkernel.XXXXXX)
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

# extract_vmlinux BZIMAGE OUT: the bzImage carries the ELF kernel compressed; try every
# xz, zstd or gzip stream start until one decompresses to an ELF file.
extract_vmlinux() {
	local bz=$1 out=$2 magic tool off
	for pair in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
		tool=${pair%%:*}
		magic=${pair#*:}
		command -v "$tool" >/dev/null || continue
		for off in $(LC_ALL=C grep -obUaP "$magic" "$bz" | cut -d: -f1); do
			tail -c +$((off + 1)) "$bz" | "$tool" -dc 2>/dev/null >"$out.part" || true
			if [ "$(head -c 4 "$out.part" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
				mv "$out.part" "$out"
				return 0
			fi
		done
	done
	rm -f "$out.part"
	return 1
}

(
	flock 9 # another run may be filling the same cache
	stamp="modules=$modules busybox=$(dpkg-query -W -f='${Version}' busybox-static)"
	if [ -f "$kdir/vmlinux" ] && [ -f "$kdir/base.cpio" ] && [ "$(cat "$kdir/stamp" 2>/dev/null)" = "$stamp" ]; then
		exit 0
	fi
	log "preparing $pkg $version in $kdir"
	started=$(date +%s)
	deb=$(ls "$kdir"/"${pkg}"_*.deb 2>/dev/null | head -n1 || true)
	if [ -z "$deb" ]; then
		(cd "$kdir" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >&2)
		deb=$(ls "$kdir"/"${pkg}"_*.deb | head -n1)
	fi
	x=$tmp/deb
	dpkg-deb -x "$deb" "$x"
	kver=$(basename "$(ls -d "$x"/lib/modules/*/)")
	moddir=$x/lib/modules/$kver
	extract_vmlinux "$x/boot/vmlinuz-$kver" "$kdir/vmlinux.new" || die "no ELF vmlinux found in vmlinuz-$kver"
	mv "$kdir/vmlinux.new" "$kdir/vmlinux"

	root=$tmp/base
	mkdir -p "$root/bin" "$root/lib/modules"
	cp /bin/busybox "$root/bin/busybox"
	# Depth-first over depends=, so every module follows what it needs.
	declare -A seen=()
	order=()
	add() {
		local m=${1//-/_} f dep
		[ -z "${seen[$m]:-}" ] || return 0
		seen[$m]=1
		f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) -print -quit)
		if [ -z "$f" ]; then
			grep -q "/$m.ko\$" "$moddir/modules.builtin" || die "module $m is neither built in nor shipped in $pkg"
			return 0
		fi
		for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add "$dep"; done
		case $f in
		*.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
		*.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
		*) cp "$f" "$root/lib/modules/$m.ko" ;;
		esac
		order+=("$m.ko")
	}
	for m in $modules; do add "$m"; done
	printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"
	log "modules in load order: ${order[*]}"
	(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$kdir/base.cpio.new"
	mv "$kdir/base.cpio.new" "$kdir/base.cpio"
	echo "$stamp" >"$kdir/stamp"
	rm -rf "$x" "$root"
	log "prepared kernel, vmlinux and module initramfs in $(($(date +%s) - started)) s"
) 9>"$cache/.lock"

# --- the test binaries and the plan (every run) ----------------------------------------
t0=$(date +%s)
tests=$tmp/tests
mkdir -p "$tests/tests"
cp "$repo/test/vmkernel/init" "$tests/init"
chmod 755 "$tests/init"
: >"$tests/tests/plan"
build() { # name package flags
	[ -n "$3" ] || return 0
	(cd "$repo" && CGO_ENABLED=0 "$GO" test -c -o "$tests/tests/$1.test" "$2")
	echo "$1.test $common_flags $3" >>"$tests/tests/plan"
}
build loader ./loader "$loader_flags"
build e2e ./test/e2e "$e2e_flags"
# iperf3 for TestBandwidthLimitsPods, with the shared libraries it links (the host's
# userland runs unchanged on the guest kernel).
command -v iperf3 >/dev/null || die "iperf3 missing (make setup installs it)"
mkdir -p "$tests/bin"
cp -L "$(command -v iperf3)" "$tests/bin/iperf3"
for lib in $(ldd "$(command -v iperf3)" | awk '$2 == "=>" {print $3} $1 ~ /^\// {print $1}'); do
	mkdir -p "$tests$(dirname "$lib")"
	cp -L "$lib" "$tests$lib"
done
# Environment for the tests (init sources it).
printf 'export TERN_EXPECT_EDT=1 TERN_BW_RATES=%s\n' "$bw_rates" >"$tests/tests/env"
(cd "$tests" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$tmp/tests.cpio"
cat "$kdir/base.cpio" "$tmp/tests.cpio" >"$tmp/initrd"
log "built test binaries and initramfs ($(du -m "$tmp/initrd" | cut -f1) MiB) in $(($(date +%s) - t0)) s"

# --- boot -----------------------------------------------------------------------------
log "booting $pkg $version under qemu TCG (killed after ${timeout_s} s)"
t0=$(date +%s)
set +e
# no_timer_check: under TCG on a loaded host the guest's IO-APIC timer check can miss its
# ticks and panic the boot ("IO-APIC + timer doesn't work"), failing the tier before any test.
timeout --foreground -k 5 "$timeout_s" qemu-system-x86_64 \
	-machine q35 -accel tcg,thread=multi -cpu max -smp "$(nproc)" -m "$mem" \
	-nodefaults -display none -serial stdio -no-reboot \
	-bios "$qboot" -kernel "$kdir/vmlinux" -initrd "$tmp/initrd" \
	-append "console=ttyS0 panic=-1 rdinit=/init quiet no_timer_check" </dev/null 2>&1 |
	tr -d '\r' | tee "$tmp/console.log"
qemu_rc=${PIPESTATUS[0]}
set -e
elapsed=$(($(date +%s) - t0))

result=$(sed -n 's/^TERN_VMKERNEL_RESULT=\([0-9]*\)$/\1/p' "$tmp/console.log" | tail -n1)
if [ -z "$result" ]; then
	case $qemu_rc in
	124 | 137) die "the VM did not finish within ${timeout_s} s: killed" ;;
	*) die "the VM stopped without a test result (qemu exit $qemu_rc) after ${elapsed} s" ;;
	esac
fi
log "tests in $pkg $version exited $result; VM wall time ${elapsed} s"
exit "$result"
