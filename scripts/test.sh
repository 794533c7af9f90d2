#!/usr/bin/env bash
# The test command: formatting, lints, every test (VM tests with real QEMU guests
# included), and a smoke run of the benchmark. Installs what it needs first.
# Usage: scripts/test.sh            (what CI runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

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

step "benchmark smoke run (tiny sample counts; figures are not meaningful)"
IVHA_BENCH_QUICK=1 cargo bench --locked -p shm --bench latency_table

# One closing line for the whole run, counted from cargo's per-binary summaries.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$test_log"
