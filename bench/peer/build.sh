#!/bin/sh
# Builds lazysnap-bench's peer, stargz-snapshotter's snapshots service
# (bench/peer/stargz/main.go), from Debian's packaged Go library
# (golang-github-containerd-stargz-snapshotter-dev 0.12 and its dependencies under
# /usr/share/gocode), in GOPATH mode, with no module downloads.
#
#   bench/peer/build.sh OUT      e.g. bench/peer/build.sh target-bench/release/lazysnap-bench-stargz
#
# Needs golang-go (1.19 in bookworm) and golang-github-containerd-stargz-snapshotter-dev.
set -eu
out=${1:?usage: build.sh OUT}
here=$(cd "$(dirname "$0")" && pwd)
gocode=/usr/share/gocode
if ! command -v go >/dev/null; then
	echo "build.sh: go is missing (Debian package golang-go)" >&2
	exit 1
fi
if [ ! -d "$gocode/src/github.com/containerd/stargz-snapshotter/service" ]; then
	echo "build.sh: $gocode lacks stargz-snapshotter (Debian package golang-github-containerd-stargz-snapshotter-dev)" >&2
	exit 1
fi
tmp=$(mktemp -d)
trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src/lazysnap-bench-stargz"
cp "$here/stargz/main.go" "$tmp/src/lazysnap-bench-stargz/"
# Stubs of the few packages bookworm lacks, each only what the build uses.
if [ -d "$here/stubs" ]; then
	cp -r "$here/stubs/." "$tmp/src/"
fi
case $out in /*) ;; *) out=$(pwd)/$out ;; esac
mkdir -p "$(dirname "$out")"
cd "$tmp/src/lazysnap-bench-stargz"
GO111MODULE=off GOPATH="$tmp:$gocode" GOPROXY=off GOFLAGS= GOCACHE="${GOCACHE:-$tmp/cache}" \
	go build -o "$out" .
echo "built $out"
