# Shared by demo.sh and test.sh: install what lazysnap needs from Debian, and Rust.

# Debian packages the daemon, the demo and the tests run against.
LAZYSNAP_PACKAGES="containerd runc docker-registry busybox-static fuse3 curl zstd tar
  protobuf-compiler gcc libc6-dev pkg-config ca-certificates"
# Only the tests: ctr-remote as an independent peer, htpasswd for registry auth tests,
# Go and containerd's Go sources for containerd's snapshotter suite (tests/snapshotter-suite),
# CNI plugins for pods with a network namespace of their own.
LAZYSNAP_TEST_PACKAGES="stargz-snapshotter apache2-utils openssl golang-go golang-github-containerd-containerd-dev
  containernetworking-plugins"

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

# containerd 2.x and Docker Engine from Debian's unstable suite (sid), for the tests that
# run against today's runtimes. They need only libc6 >= 2.34 and run on bookworm. apt's
# state for sid lives in the private directory too, and the mirror is the one apt's
# sources already name: nothing of the system's packages or sources changes.
LAZYSNAP_SID_PACKAGES="containerd docker.io docker-cli"
export LAZYSNAP_RUNTIMES_DIR=${LAZYSNAP_RUNTIMES_DIR:-/var/cache/lazysnap-runtimes}
fetch_sid_runtimes() {
  local dir=$LAZYSNAP_RUNTIMES_DIR
  if [ -x "$dir/root/usr/bin/containerd" ] && [ -x "$dir/root/usr/sbin/dockerd" ]; then
    return 0
  fi
  local codename mirror
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  sources_mirror() {
    apt-cache policy | awk -v s="$codename/main" '$3 == s && $2 ~ /^https?:/ {print $2; exit}'
  }
  mirror=$(sources_mirror)
  if [ -z "$mirror" ]; then
    # apt knows its sources only once it has read them (images often ship without lists).
    apt-get -o DPkg::Lock::Timeout=900 update -q >/dev/null
    mirror=$(sources_mirror)
  fi
  if [ -z "$mirror" ]; then
    echo "fetch_sid_runtimes: apt's sources name no Debian mirror for $codename" >&2
    return 1
  fi
  local apt=$dir/apt
  rm -rf "$dir" && mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$dir/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" >"$apt/sources.list"
  local opts=(-q -o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts=-
    -o Dir::State::lists="$apt/lists" -o Dir::Cache::archives="$apt/archives"
    -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
  echo "fetching $LAZYSNAP_SID_PACKAGES from sid into $dir"
  apt-get "${opts[@]}" update >/dev/null &&
    (cd "$dir/debs" && apt-get "${opts[@]}" download $LAZYSNAP_SID_PACKAGES) || return 1
  for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root" || return 1; done
  rm -rf "$apt"
  "$dir/root/usr/bin/containerd" --version
}
