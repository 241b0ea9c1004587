# Shared by demo.sh and test.sh: install what lazysnap needs from Debian, and Rust.

# Debian packages the daemon, the demo and the tests run against.
LAZYSNAP_PACKAGES="containerd runc docker-registry busybox-static fuse3 curl zstd tar
  protobuf-compiler gcc libc6-dev pkg-config ca-certificates"
# Only the tests: ctr-remote as an independent peer, htpasswd for registry auth tests,
# Go and containerd's Go sources for containerd's snapshotter suite (tests/snapshotter-suite).
LAZYSNAP_TEST_PACKAGES="stargz-snapshotter apache2-utils openssl golang-go golang-github-containerd-containerd-dev"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "$0: run as root (it installs packages, runs containerd and mounts snapshots)" >&2
    exit 2
  fi
}

apt_install() {
  local missing=""
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "installing:$missing"
    apt-get -o DPkg::Lock::Timeout=900 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q $missing
  fi
}

ensure_rust() {
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
  if ! command -v cargo >/dev/null; then
    # Debian 12's rustc is too old for this workspace (edition 2024): use rustup's stable.
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
    . "$HOME/.cargo/env"
  fi
}
