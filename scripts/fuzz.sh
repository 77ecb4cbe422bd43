#!/usr/bin/env bash
# Coverage-guided fuzzing of the contract's parsers (fuzz/, see fuzz/README.md), bounded in time.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]     (default: 8 seconds, every target)
#
# Builds the libFuzzer targets on the stable toolchain with the SanitizerCoverage flags cargo-fuzz
# uses (no nightly, no cargo-fuzz install), in a target directory of their own (those flags must
# never reach the shared build cache), then runs each target for the given time, two at a time,
# starting from the committed corpus fuzz/corpus/<target>/. New inputs the fuzzer finds go to a
# scratch corpus outside the repository. Exits non-zero if a target crashed, leaked past the
# memory limit or hung, naming the file that holds the input; never skips silently.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-8}"
shift || true
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz.sh: seconds-per-target must be a positive integer, got '$secs'" >&2
  exit 2
fi

fail() {
  echo "fuzz.sh: $*" >&2
  exit 1
}
command -v cargo >/dev/null || fail "cargo is not installed; the fuzz step cannot run"
command -v rustc >/dev/null || fail "rustc is not installed; the fuzz step cannot run"
command -v c++ >/dev/null || command -v clang++ >/dev/null ||
  fail "no C++ compiler (c++ or clang++): libfuzzer-sys needs one to build libFuzzer"

mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^dmr-fuzz$')
[ "${#all[@]}" -gt 0 ] || fail "no [[bin]] targets found in fuzz/Cargo.toml"
if [ "$#" -gt 0 ]; then
  targets=("$@")
  for t in "${targets[@]}"; do
    printf '%s\n' "${all[@]}" | grep -qx "$t" || fail "unknown target '$t' (targets: ${all[*]})"
  done
else
  targets=("${all[@]}")
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
target_dir="${DMR_FUZZ_TARGET_DIR:-$HOME/.cache/dmr-fuzz-target}"
work="$target_dir/runs"
# The flags cargo-fuzz passes (without a sanitizer): 8-bit counters, PC table and comparison
# tracing for libFuzzer's feedback, `--cfg fuzzing` for libfuzzer-sys (assertions and overflow checks
# are on in fuzz/Cargo.toml's release profile). `--target` keeps them off build scripts and proc
# macros. CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS, so it is unset.
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"

echo "== fuzz: building ${#targets[@]} targets ($host, $target_dir)"
start=$SECONDS
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="$flags" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet --release --manifest-path fuzz/Cargo.toml --target "$host" "${bins[@]}" ||
  fail "building the fuzz targets failed"
echo "   built in $((SECONDS - start)) s"

bin_dir="$target_dir/$host/release"
artifacts="$PWD/fuzz/artifacts"
run_target() {
  local t="$1" scratch="$work/corpus/$1" log="$work/$1.log"
  rm -rf "$scratch" && mkdir -p "$scratch" "$artifacts/$t"
  # The first corpus directory receives new inputs: the scratch one, so the committed corpus only
  # grows by hand (fuzz/README.md). -timeout: one input taking longer is a hang. -rss_limit_mb and
  # -malloc_limit_mb: unbounded allocation is a failure.
  "$bin_dir/$t" "$scratch" "fuzz/corpus/$t" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=512 -max_len=16384 \
    -artifact_prefix="$artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 && echo 0 >"$work/$t.status" ||
    echo "$?" >"$work/$t.status"
}

mkdir -p "$work"
echo "== fuzz: ${secs} s per target, two at a time"
start=$SECONDS
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge 2 ]; then
    wait -n || true
    running=$((running - 1))
  fi
  rm -f "$work/$t.status"
  run_target "$t" &
  running=$((running + 1))
done
wait

failed=()
for t in "${targets[@]}"; do
  log="$work/$t.log"
  status="$(cat "$work/$t.status" 2>/dev/null || echo "no status")"
  if [ "$status" = 0 ] && ! grep -q "INITED cov: " "$log"; then
    # A build without the coverage flags still runs, blind: that must not pass as fuzzing.
    failed+=("$t")
    echo "   $t FAILED: libFuzzer saw no coverage (built without the SanitizerCoverage flags?); see $log"
  elif [ "$status" = 0 ]; then
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")"
    rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")"
    printf '   %-16s ok: %10s runs, %7s exec/s, %5s MB peak RSS\n' "$t" "$runs" "$rate" "$rss"
  else
    failed+=("$t")
    echo "   $t FAILED (exit status $status); the end of its log ($log):"
    tail -n 40 "$log" | sed 's/^/     /'
    crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    if [ -n "$crash" ]; then
      echo "   input: $crash"
      echo "   reproduce: $bin_dir/$t $crash"
    else
      echo "   (no input was written; see the log)"
    fi
  fi
done
echo "   fuzzed in $((SECONDS - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]} (inputs under fuzz/artifacts/; fuzz/README.md says how to minimise one and add it to the corpus)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
