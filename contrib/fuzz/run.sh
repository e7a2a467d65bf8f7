#!/bin/bash
# Coverage-guided fuzzing of every parser of untrusted bytes (issue 12), with
# cargo-fuzz (libFuzzer). Not part of CI: run it by hand.
#
#   bash contrib/fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 60); TARGETs default to all of them. Prints, per
# target, the executions and the crashes found; the run's corpus, logs and
# crash inputs are kept in $FUZZ_WORK (default /tmp/erofs-fanotify-fuzz), the
# seed corpus in contrib/fuzz/seeds/ is only read. Exit status 1 if any target
# crashed (including failed in-target assertions or a timeout/OOM).
#
# Toolchain: cargo-fuzz needs nightly flags (-Zsanitizer=address). On a
# stable toolchain (e.g. 1.95) RUSTC_BOOTSTRAP=1 lets stable accept them;
# this script sets it. Install once with `cargo install cargo-fuzz`.
set -euo pipefail

SECONDS_PER_TARGET=${1:-60}
shift || true
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${FUZZ_WORK:-/tmp/erofs-fanotify-fuzz}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$WORK/target}

ALL=(fanotify_batch erofs_walk erofs_format oci_manifest trace_file zinfo_parse gzip_span gzip_build multipart artifact)
if [ "$#" -eq 0 ]; then TARGETS=("${ALL[@]}"); else TARGETS=("$@"); fi

# Per-target libFuzzer options: the zinfo parser needs inputs of at least one
# 32785-byte checkpoint.
max_len() {
    case "$1" in
        zinfo_parse) echo 70000 ;;
        erofs_walk) echo 65536 ;;
        multipart | gzip_build | gzip_span | erofs_format) echo 16384 ;;
        *) echo 8192 ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

mkdir -p "$WORK"
cd "$HERE/../.."
echo "building ${#TARGETS[@]} fuzz targets (target dir $CARGO_TARGET_DIR) ..."
: >"$WORK/build.log"
for t in "${TARGETS[@]}"; do
    cargo fuzz build --fuzz-dir "$HERE" -O --debug-assertions "$t" >>"$WORK/build.log" 2>&1 || {
        tail -30 "$WORK/build.log" >&2
        exit 2
    }
done

failed=0
printf '%-16s %12s %10s %8s  %s\n' target executions exec/s crashes corpus
for t in "${TARGETS[@]}"; do
    corpus="$WORK/corpus/$t"
    artifacts="$WORK/artifacts/$t"
    log="$WORK/$t.log"
    mkdir -p "$corpus" "$artifacts"
    set +e
    cargo fuzz run --fuzz-dir "$HERE" -O --debug-assertions "$t" "$corpus" "$HERE/seeds/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    crashes=$(find "$artifacts" -type f | wc -l)
    size=$(find "$corpus" -type f | wc -l)
    printf '%-16s %12s %10s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$crashes" "$size"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "  $t: exit $rc; crash inputs in $artifacts; log $log" >&2
        grep -m5 -E 'panicked|ERROR: |SUMMARY' "$log" | sed 's/^/    /' >&2 || true
    fi
done
exit "$failed"
