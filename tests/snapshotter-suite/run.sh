#!/bin/bash
# Runs containerd 1.6's snapshotter test suite against lazysnapd (see suite_test.go).
# Usage: run.sh LAZYSNAPD_BINARY   (as root; installs golang-go and containerd's Go
# sources from Debian if missing). Prints one line per case and, last,
# "N passed, M failed, K skipped"; exits non-zero if anything failed or it could not run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
binary=$(realpath "${1:?usage: run.sh LAZYSNAPD_BINARY}")
work=${LAZYSNAP_SUITE_WORK:-/tmp/lazysnap-snapshotter-suite}

need=""
for p in golang-go golang-github-containerd-containerd-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  apt-get -o DPkg::Lock::Timeout=900 update -q
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -q $need
fi

# GOPATH mode over Debian's Go sources: no module downloads.
export GO111MODULE=off GOFLAGS= GOPATH="$work/gopath:/usr/share/gocode" GOCACHE="$work/gocache"
pkg="$work/gopath/src/lazysnapsuite"
rm -rf "$pkg" && mkdir -p "$pkg"
cp "$here/suite_test.go" "$pkg/"
(cd "$pkg" && go vet . && go test -c -o "$work/suite.test" .)

log="$work/suite.log"
set +e
LAZYSNAPD="$binary" "$work/suite.test" -test.root -test.v -test.count=1 -test.timeout=20m \
  -test.run '^TestLazysnapd$' >"$log" 2>&1
status=$?
set -e
grep -E '^ +--- (PASS|FAIL|SKIP): TestLazysnapd/' "$log" | sed -E 's/^ +--- /  /' || true
pass=$(grep -cE '^ +--- PASS: TestLazysnapd/' "$log" || true)
fail=$(grep -cE '^ +--- FAIL: TestLazysnapd/' "$log" || true)
skip=$(grep -cE '^ +--- SKIP: TestLazysnapd/' "$log" || true)
if [ "$status" != 0 ] && [ "$fail" = 0 ]; then
  # Failed outside any case (build, flags, a panic): show why, and count it.
  tail -40 "$log"
  fail=1
fi
if [ "$pass" = 0 ] && [ "$fail" = 0 ]; then
  echo "the suite ran no case; log: $log"
  tail -40 "$log"
  fail=1
fi
[ "$fail" = 0 ] || grep -B2 -A20 -E '^ +--- FAIL' "$log" | head -80
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" = 0 ]
