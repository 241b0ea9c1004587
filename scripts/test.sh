#!/usr/bin/env bash
# Installs what the tests need and runs them all: formatting, clippy, every crate's unit
# and integration tests (real containerd 1.6 and 2.x, registry, overlayfs; as root), and
# containerd's own snapshotter test suite against lazysnapd. Ends with one line: N passed, M failed.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
apt_install $LAZYSNAP_PACKAGES $LAZYSNAP_TEST_PACKAGES
fetch_sid_runtimes || { echo "could not fetch containerd 2.x and Docker from Debian sid" >&2; exit 1; }
ensure_rust

log=$(mktemp /tmp/lazysnap-test.XXXXXX)
trap 'rm -f "$log"' EXIT
failed_steps=()
step() {
  local name=$1; shift
  echo "==== $name"
  if ! "$@"; then
    failed_steps+=("$name")
  fi
}

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --locked --workspace --all-targets -- -D warnings
export RUSTDOCFLAGS="-D warnings"
step "cargo doc" cargo doc --locked --workspace --no-deps --quiet
step "cargo test" bash -c "set -o pipefail; cargo test --locked --workspace 2>&1 | tee '$log'"
# The daemon's end-to-end tests again, on containerd 2.x (Debian sid's, see lib.sh).
step "cargo test, containerd 2" bash -c "set -o pipefail; LAZYSNAP_CONTAINERD=2 cargo test --locked -p daemon --tests 2>&1 | tee -a '$log'"
# Each parser under libFuzzer for a few seconds: the harnesses build and find nothing new
# to crash on (the long runs are scripts/fuzz.sh 600 by hand; see fuzz/README.md).
step "fuzz smoke" scripts/fuzz.sh 10

passed=0; failed=0; skipped=0
while read -r p f i; do
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + i))
done < <(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$log")

echo "==== containerd's snapshotter test suite (tests/snapshotter-suite)"
cargo build --locked -q -p daemon --bin lazysnapd
tests/snapshotter-suite/run.sh target/debug/lazysnapd 2>&1 | tee -a "$log" | grep -E '^  (PASS|FAIL|SKIP)|passed,' || true
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
sp=$(echo "$line" | sed -nE 's/^([0-9]+) passed.*/\1/p')
sf=$(echo "$line" | sed -nE 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/p')
ss=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p')
# It must run: no result line is a failure, as is a suite that passed nothing.
if [ -z "$sp" ] || [ "$sp" = 0 ]; then failed_steps+=("snapshotter suite (did not run)"); fi
passed=$((passed + ${sp:-0})); failed=$((failed + ${sf:-0})); skipped=$((skipped + ${ss:-0}))

if [ ${#failed_steps[@]} -gt 0 ]; then
  echo "failed steps: ${failed_steps[*]}"
  [ "$failed" -gt 0 ] || failed=${#failed_steps[@]}
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] && [ ${#failed_steps[@]} = 0 ]
