#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (libFuzzer through libfuzzer-sys, on stable Rust: the
# coverage instrumentation cargo-fuzz would ask rustc for is passed here as RUSTFLAGS, so
# nothing needs installing beyond a C++ compiler) and runs them. See docs/fuzzing.md.
#
# Usage: scripts/fuzz.sh --smoke [--time S]        every target S seconds (default 15) from its
#                                                 corpus; fails on any crash (what CI runs)
#        scripts/fuzz.sh TARGET [--time S] [--runs N]  one target long: N executions or S seconds
#                                                 (default 1800), whichever comes first; new
#                                                 inputs go to a work corpus under the target dir
#        scripts/fuzz.sh --minimize TARGET        merges the committed and work corpora into a
#                                                 fresh minimal set and replaces fuzz/corpus/TARGET
#        scripts/fuzz.sh --seeds                  rewrites the seed inputs (seed-*) of every corpus
#        scripts/fuzz.sh --build | --list         builds only | lists the targets
#        --no-build (with any of the above)       uses the targets as last built
# Crashes are written to TARGET_DIR/fuzz/artifacts/TARGET/ (never into the repository).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh

say() { echo "fuzz: $*"; }
die() {
    echo "fuzz: error: $*" >&2
    exit 1
}
usage() {
    sed -n '2,18s/^# \{0,1\}//p' "$0"
    exit "${1:-0}"
}

mode="" target="" time="" runs="" no_build=0
while (($#)); do
    case $1 in
    --smoke | --seeds | --build | --list) mode=${1#--} ;;
    --minimize)
        mode=minimize
        target=${2:-}
        shift
        ;;
    --no-build) no_build=1 ;;
    --time)
        time=${2:?--time needs seconds}
        shift
        ;;
    --runs)
        runs=${2:?--runs needs a number}
        shift
        ;;
    -h | --help) usage ;;
    -*) die "unknown argument '$1' (try --help)" ;;
    *)
        [[ -z $target ]] || die "one target at a time"
        mode=${mode:-long}
        target=$1
        ;;
    esac
    shift
done
[[ -n $mode ]] || usage 2

triple=$(rustc -vV | sed -n 's/^host: //p')
fuzz_dir=$target_dir/fuzz
bin_dir=$fuzz_dir/$triple/release
mapfile -t targets < <(ls fuzz/fuzz_targets | sed -n 's/\.rs$//p')
if [[ $mode == list ]]; then
    printf '%s\n' "${targets[@]}"
    exit 0
fi
if [[ -n $target ]] && ! printf '%s\n' "${targets[@]}" | grep -qx "$target"; then
    die "no target '$target' (there are: ${targets[*]})"
fi

# What cargo-fuzz passes (its defaults, sanitizer none): SanitizerCoverage with inline 8-bit
# counters, the PC table and compare tracing, which libFuzzer reads; `--cfg fuzzing`.
# --target keeps these flags off build scripts and proc macros.
build() {
    local started=$SECONDS
    ((no_build == 0)) || return 0
    say "building the targets (release, debug assertions, overflow checks)"
    RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
        CARGO_TARGET_DIR=$fuzz_dir nice -n 19 cargo build --locked --release \
        --manifest-path fuzz/Cargo.toml --target "$triple" "${targets[@]/#/--bin=}"
    say "built in $((SECONDS - started)) s"
}

# run TARGET SECONDS RUNS NEW_CORPUS: runs libFuzzer on TARGET's corpus (new inputs go to
# NEW_CORPUS), prints its figures; returns libFuzzer's status.
run() {
    local name=$1 seconds=$2 count=$3 new=$4 log status=0
    local artifacts=$fuzz_dir/artifacts/$name/
    mkdir -p "$new" "$artifacts" "fuzz/corpus/$name"
    log=$fuzz_dir/logs/$name.log
    mkdir -p "${log%/*}"
    local limits=(-max_total_time="$seconds")
    [[ -z $count ]] || limits+=(-runs="$count")
    # event_log_cli's renderer warns on stderr about every line that is not JSON: gigabytes
    # in a long run. libFuzzer keeps its own output; a crash's panic message shows when its
    # input is replayed (docs/fuzzing.md).
    [[ $name != event_log_cli ]] || limits+=(-close_fd_mask=2)
    nice -n 19 "$bin_dir/$name" "${limits[@]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts" "$new" "fuzz/corpus/$name" \
        >"$log" 2>&1 || status=$?
    local execs secs
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    if ((status != 0)); then
        echo "--- $name failed (status $status); last lines of $log:" >&2
        grep -v '^#' "$log" | tail -n 40 >&2
        echo "--- artifacts in $artifacts" >&2
        return "$status"
    fi
    printf '  %-18s %12s execs %6s s %9s exec/s  corpus %s files\n' "$name" "${execs:-?}" \
        "${secs:-?}" "$(((${execs:-0}) / (${secs:-1} > 0 ? ${secs:-1} : 1)))" \
        "$(find "fuzz/corpus/$name" "$new" -type f | wc -l)"
}

case $mode in
build) build ;;
smoke)
    build
    started=$SECONDS
    failed=()
    say "smoke: every target ${time:-15} s from its committed corpus"
    for t in "${targets[@]}"; do
        scratch=$fuzz_dir/smoke/$t
        rm -rf "$scratch"
        run "$t" "${time:-15}" "" "$scratch" || failed+=("$t")
    done
    say "smoke runs took $((SECONDS - started)) s"
    ((${#failed[@]} == 0)) || die "crashed: ${failed[*]} (see above)"
    ;;
long)
    build
    say "$target: ${runs:+$runs runs or }${time:-1800} s, new inputs in $fuzz_dir/work/$target"
    run "$target" "${time:-1800}" "$runs" "$fuzz_dir/work/$target"
    ;;
minimize)
    [[ -n $target ]] || die "--minimize needs a target"
    build
    fresh=$fuzz_dir/minimized/$target
    rm -rf "$fresh"
    mkdir -p "$fresh" "$fuzz_dir/work/$target"
    before=$(find "fuzz/corpus/$target" "$fuzz_dir/work/$target" -type f | wc -l)
    nice -n 19 "$bin_dir/$target" -merge=1 -timeout=10 "$fresh" "fuzz/corpus/$target" \
        "$fuzz_dir/work/$target" >"$fuzz_dir/logs/$target.merge.log" 2>&1 ||
        die "merge failed: see $fuzz_dir/logs/$target.merge.log"
    rm -rf "fuzz/corpus/$target"
    cp -r "$fresh" "fuzz/corpus/$target"
    say "$target: $before inputs merged into $(find "fuzz/corpus/$target" -type f | wc -l) ($(du -sh "fuzz/corpus/$target" | cut -f1))"
    ;;
seeds)
    say "writing seed inputs into fuzz/corpus/"
    CARGO_TARGET_DIR=$fuzz_dir/seeds nice -n 19 cargo run --locked --release --quiet \
        --manifest-path fuzz/Cargo.toml --no-default-features --bin make-seeds -- fuzz/corpus
    # QMP: QEMU's own greeting, replies, errors and events, when QEMU is installed.
    if command -v qemu-system-x86_64 >/dev/null; then
        printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-status"}' \
            '{"execute":"stop"}' '{"execute":"cont"}' '{"execute":"no-such-command"}' \
            '{"execute":"quit"}' |
            timeout 20 qemu-system-x86_64 -machine none -nodefaults -display none -qmp stdio \
                >fuzz/corpus/qmp/seed-qemu-session 2>/dev/null || true
    fi
    ;;
esac
