#!/usr/bin/env bash
# Installs what the tests need and runs them all: formatting, clippy, every crate's unit
# and integration tests (real containerd, registry, overlayfs; as root), and containerd's
# own snapshotter test suite against lazysnapd. Ends with one line: N passed, M failed.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
apt_install $LAZYSNAP_PACKAGES $LAZYSNAP_TEST_PACKAGES
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

passed=0; failed=0; skipped=0
while read -r p f i; do
  passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + i))
done < <(sed -nE 's/^test result: [a-zA-Z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored.*/\1 \2 \3/p' "$log")

suite=../shared/snapshotter-testsuite
if [ -x "$suite/run.sh" ]; then
  echo "==== containerd snapshotter test suite ($suite)"
  "$suite/build.sh" >/dev/null
  cargo build --locked -q -p daemon --bin lazysnapd
  SNAPSHOTTER_CMD="$PWD/target/debug/lazysnapd --root {root} --address {sock}" \
    "$suite/run.sh" 2>&1 | tee -a "$log" | grep -E '^  (PASS|FAIL|SKIP)|passed,'
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
  sp=$(echo "$line" | sed -nE 's/^([0-9]+) passed.*/\1/p')
  sf=$(echo "$line" | sed -nE 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/p')
  ss=$(echo "$line" | sed -nE 's/.*, ([0-9]+) skipped.*/\1/p')
  if [ -z "$sp" ]; then failed_steps+=("snapshotter suite (no result)"); fi
  passed=$((passed + ${sp:-0})); failed=$((failed + ${sf:-0})); skipped=$((skipped + ${ss:-0}))
else
  echo "==== containerd snapshotter test suite: not found at $suite, not run"
fi

if [ ${#failed_steps[@]} -gt 0 ]; then
  echo "failed steps: ${failed_steps[*]}"
  [ "$failed" -gt 0 ] || failed=${#failed_steps[@]}
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ] && [ ${#failed_steps[@]} = 0 ]
