#!/usr/bin/env bash
# Coverage-guided fuzzing of lazysnap's parsers with cargo-fuzz (libFuzzer, AddressSanitizer):
# footer, toc, layer, tar (estargz), fuse (FUSE request decoding and handling), gzip_span
# (SOCI checkpoints), ztoc (SOCI zTOCs and the tar headers they record) and pyc (a
# compiled Python module's imports).
#
#   scripts/fuzz.sh SECONDS [TARGET...]   run each target for SECONDS (default: all)
#   FUZZ_KEEP_CORPUS=1 scripts/fuzz.sh …  add what libFuzzer finds to fuzz/corpus/
#
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz's -Z flags through on stable Rust. Leak detection is
# off: memory kept by threads and statics at exit is not a bug in safe Rust, and
# LeakSanitizer reported such a leak once in 30,000 tar runs that no rerun of the input
# showed. Exits non-zero
# on the first crash (libFuzzer leaves the input in fuzz/artifacts/TARGET/).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:?usage: fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(footer toc layer tar fuse gzip_span ztoc pyc)
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O 2>&1 | tail -2
for t in "${targets[@]}"; do
  if [ "${FUZZ_KEEP_CORPUS:-}" = 1 ]; then
    corpus=corpus/$t
  else
    # A scratch copy: a smoke run leaves the committed corpus as it is.
    corpus=$(mktemp -d /tmp/lazysnap-fuzz-$t.XXXXXX)
    cp -r corpus/$t/. "$corpus"/
  fi
  echo "== $t: ${seconds}s"
  log=$(mktemp /tmp/lazysnap-fuzz-$t.XXXXXX.log)
  set +e
  cargo fuzz run -O "$t" "$corpus" -- -max_total_time="$seconds" -dict=estargz.dict \
    -max_len=1048576 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -detect_leaks=0 >"$log" 2>&1
  status=$?
  set -e
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|.*panicked|SUMMARY|Test unit written)' "$log" || tail -20 "$log"
  rm -f "$log"
  [ "${FUZZ_KEEP_CORPUS:-}" = 1 ] || rm -rf "$corpus"
  if [ "$status" != 0 ]; then
    echo "fuzz: $t crashed (see fuzz/artifacts/$t/)"
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
