#!/usr/bin/env bash
# The test command: formatting, lints, every test (VM tests with real QEMU guests
# included), short fault campaigns (user and bridge networking), and a smoke run of the
# benchmark. Installs what it needs first. Needs root (bridge mode).
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
# campaign_failed DIR WHAT: says so, with the end of each of the run's logs, and stops.
campaign_failed() {
    echo "$2 failed; its files are in $1" >&2
    for log in "$1"/logs/*; do
        [[ -f $log ]] && { echo "===== $log (last 40 lines)"; tail -n 40 "$log"; }
    done
    exit 1
}
"$target_dir/debug/ivha-campaign" run --seed "$campaign_seed" --cycles 14 --backend qemu \
    --out "$campaign_dir" || campaign_failed "$campaign_dir" "the fault campaign"

# The same in bridge mode, shorter: writers reach the identities at their service IPs on a
# bridge hostd makes inside a network namespace made for the run (and removed after it).
bridge_seed=$((campaign_seed + 1))
step "fault campaign in bridge mode (7 cycles, seed $bridge_seed, QEMU guests)"
bridge_dir=$target_dir/campaign/ci-bridge-seed-$bridge_seed
campaign_ns=ivha-ci-$$
ip netns add "$campaign_ns"
trap 'rm -f "$test_log"; ip netns del "$campaign_ns" 2>/dev/null || true' EXIT
ip -n "$campaign_ns" link set lo up
ip netns exec "$campaign_ns" "$target_dir/debug/ivha-campaign" run --network bridge \
    --seed "$bridge_seed" --cycles 7 --backend qemu --out "$bridge_dir" ||
    campaign_failed "$bridge_dir" "the bridge-mode fault campaign"
ip netns del "$campaign_ns"

step "benchmark smoke run (tiny sample counts; figures are not meaningful)"
IVHA_BENCH_QUICK=1 cargo bench --locked -p shm --bench latency_table

# One closing line for the whole run, counted from cargo's per-binary summaries.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$test_log"
