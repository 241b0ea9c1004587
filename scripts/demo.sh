#!/usr/bin/env bash
# The main job, end to end on this machine: start a local registry, lazysnapd and a
# containerd that uses it as its `lazysnap` snapshotter; push a small image, convert it to
# eStargz with `lazysnap convert`, pull it lazily with `lazysnap rpull` and run it.
# Everything it starts it stops again, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
apt_install $LAZYSNAP_PACKAGES
ensure_rust

echo "==== building lazysnapd"
cargo build --release --locked -q -p daemon --bins
cargo build --release --locked -q -p testkit --example push_busybox
bin=$PWD/target/release

work=$(mktemp -d /tmp/lazysnap-demo.XXXXXX)
pids=()
cleanup() {
  set +e
  [ -S "$work/containerd.sock" ] && ctr -a "$work/containerd.sock" -n demo image rm --sync "$ref" >/dev/null 2>&1
  for ((i=${#pids[@]}-1; i>=0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null && wait "${pids[i]}" 2>/dev/null
  done
  # lazysnapd leaves its lazy layers to its fd holder on SIGTERM; this removes both.
  [ -d "$work/lazysnap" ] && "$bin/lazysnapd" --root "$work/lazysnap" --unmount-all >/dev/null 2>&1
  awk -v d="$work" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT
wait_for() { # what, test command...
  local what=$1; shift
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$what did not come up; logs in $work" >&2; exit 1
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 5055)
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:$port
YML
echo "==== starting docker-registry on 127.0.0.1:$port"
docker-registry serve "$work/registry/config.yml" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_for docker-registry curl -sf "http://127.0.0.1:$port/v2/"

echo "==== starting lazysnapd (root $work/lazysnap, socket $work/lazysnap.sock)"
"$bin/lazysnapd" --root "$work/lazysnap" --address "$work/lazysnap.sock" >"$work/lazysnapd.log" 2>&1 &
pids+=($!)
wait_for lazysnapd test -S "$work/lazysnap.sock"

cat > "$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[proxy_plugins.lazysnap]
  type = "snapshot"
  address = "$work/lazysnap.sock"
TOML
echo "==== starting containerd with [proxy_plugins.lazysnap]"
containerd --config "$work/containerd.toml" >"$work/containerd.log" 2>&1 &
pids+=($!)
wait_for containerd ctr -a "$work/containerd.sock" version

ctr() { command ctr -a "$work/containerd.sock" -n demo "$@"; }
echo "==== building and pushing a busybox image"
plain=$("$bin/examples/push_busybox" "127.0.0.1:$port" demo/busybox latest)
echo "pushed $plain"

ref="127.0.0.1:$port/demo/busybox:estargz"
echo "==== lazysnap convert $plain $ref"
"$bin/lazysnap" convert --no-progress-bars "$plain" "$ref"

echo "==== lazysnap rpull $ref (layers mounted lazily, not downloaded)"
"$bin/lazysnap" rpull -a "$work/containerd.sock" -n demo "$ref"
echo "==== ctr run --snapshotter lazysnap $ref"
ctr run --rm --snapshotter lazysnap "$ref" demo-1
echo "==== the layers are FUSE mounts served by lazysnapd:"
grep " fuse.lazysnap " /proc/mounts | cut -d" " -f1-3
echo "==== lazysnap status"
"$bin/lazysnap" status --root "$work/lazysnap"

echo "==== the plain gzip image through the same snapshotter: falls back to download + unpack"
ctr image pull --plain-http --snapshotter lazysnap "$plain" | tail -1
ctr run --rm --snapshotter lazysnap "$plain" demo-3
ctr image rm --sync "$plain" >/dev/null
echo "==== demo done; stopping everything"
