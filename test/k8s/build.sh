#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries the tests and the demo run against
# (etcd, kube-apiserver, kube-controller-manager, kube-proxy) from the Go module proxy, using
# the tools module in test/k8s/tools. The output lives outside the repository, in a directory
# keyed by the Kubernetes and Go versions, because a cold build takes minutes and gigabytes.
#
# Usage: test/k8s/build.sh            builds if needed, then prints the binary directory
#        TERN_K8S_BIN_DIR=/dir ...     builds into /dir instead of the default cache dir
#
# It is a no-op (seconds) when all four binaries already exist in the directory. The flags
# below never vary between runs so that Go's build cache stays warm.
set -euo pipefail

K8S_VERSION=v1.37.2
K8S_MAJOR=1
K8S_MINOR=37

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/tools"
go_bin="${GO:-go}"
go_version="$("$go_bin" env GOVERSION)"
bin_dir="${TERN_K8S_BIN_DIR:-/var/cache/tern/k8s/${K8S_VERSION}-${go_version}}"
binaries=(etcd kube-apiserver kube-controller-manager kube-proxy)

have_all() {
	local b
	for b in "${binaries[@]}"; do
		[[ -x "$bin_dir/$b" ]] || return 1
	done
}

if have_all; then
	echo "$bin_dir"
	exit 0
fi

mkdir -p "$bin_dir"
# Two callers (make and a test run, say) must not build into the same directory at once.
exec 9>"$bin_dir/.build.lock"
flock 9
if have_all; then
	echo "$bin_dir"
	exit 0
fi

ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$K8S_MAJOR -X $pkg.gitMinor=$K8S_MINOR"
	ldflags+=" -X $pkg.gitTreeState=clean"
done

tmp="$(mktemp -d "$bin_dir/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "building Kubernetes $K8S_VERSION control plane with $go_version into $bin_dir (cold: ~8 min, ~2.5 GB RAM)" >&2
start=$SECONDS
(
	cd "$tools"
	CGO_ENABLED=0 "$go_bin" build -mod=readonly -buildvcs=false -trimpath -ldflags "${ldflags# }" -o "$tmp/" \
		go.etcd.io/etcd/server/v3 \
		k8s.io/kubernetes/cmd/kube-apiserver \
		k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kube-proxy
)
# etcd's main package is named after its directory ("server").
mv "$tmp/server" "$tmp/etcd"
for b in "${binaries[@]}"; do
	mv -f "$tmp/$b" "$bin_dir/$b"
done
echo "built in $((SECONDS - start)) s" >&2

version="$("$bin_dir/kube-apiserver" --version)"
if [[ "$version" != "Kubernetes $K8S_VERSION" ]]; then
	echo "kube-apiserver reports '$version', want 'Kubernetes $K8S_VERSION': check the -X ldflags in $0" >&2
	exit 1
fi
echo "$bin_dir"
