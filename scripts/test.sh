#!/usr/bin/env bash
# The test command: formatting, lints, every test (VM tests with real QEMU guests
# included), a short fault campaign, and a smoke run of the benchmark. Installs what it
# needs first.
# Usage: scripts/test.sh            (what CI runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh

step() { printf '\n== %s\n' "$*"; }

step "dependencies"
scripts/install-deps.sh

step "guest image (for the VM tests)"
scripts/build-guest-image.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$test_log"

# Each kind of fault twice against real QEMU guests, with a fresh seed each run (printed,
# with the command that replays it). `cargo test` built the binaries.
campaign_seed=${IVHA_CAMPAIGN_SEED:-$(( $(date +%s) % 1000000 ))}
step "fault campaign (14 cycles, seed $campaign_seed, QEMU guests)"
campaign_dir=$target_dir/campaign/ci-seed-$campaign_seed
if ! "$target_dir/debug/ivha-campaign" run --seed "$campaign_seed" --cycles 14 --backend qemu --out "$campaign_dir"; then
    echo "the fault campaign failed; its files are in $campaign_dir" >&2
    for log in "$campaign_dir"/logs/*; do
        [[ -f $log ]] && { echo "===== $log (last 40 lines)"; tail -n 40 "$log"; }
    done
    exit 1
fi

step "benchmark smoke run (tiny sample counts; figures are not meaningful)"
IVHA_BENCH_QUICK=1 cargo bench --locked -p shm --bench latency_table

# One closing line for the whole run, counted from cargo's per-binary summaries.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$test_log"
