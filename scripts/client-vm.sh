#!/usr/bin/env bash
# The client VM run, long version: builds what it needs (hostd, ivha-campaign, the guest and
# client images), then runs `ivha-campaign client-vm`: a pair, and a client VM with ext4 on
# export a through QEMU's NBD driver, writing and fsyncing files while node a is killed, hung
# and moved by a planned takeover EVENTS times each, with a giveback after each. Prints each
# event, then the per-kind stall table (p50, p99, max), the client's I/O errors, the e2fsck
# verdict and the file checks; exits 0 when the run passed, 1 on violations, 3 on other
# failures. Interrupted, it stops the pair and the client VM it started. See docs/clients.md.
#
# Environment: EVENTS (rounds, default 20), BACKEND (the pair's: qemu, default, or process),
# OUT (directory for the report and logs; default $CARGO_TARGET_DIR/client-vm/events-N-DATE).
# Usage: [EVENTS=N] scripts/client-vm.sh [more ivha-campaign client-vm arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh

events=${EVENTS:-20}
backend=${BACKEND:-qemu}
out=${OUT:-$target_dir/client-vm/events-$events-$(date +%Y%m%d-%H%M%S)}
die() {
    echo "client-vm: error: $*" >&2
    exit 3
}
[[ $events =~ ^[1-9][0-9]*$ ]] || die "EVENTS=$events is not a positive number"

scripts/install-deps.sh >/dev/null || die "scripts/install-deps.sh failed"
cargo build --quiet -p hostd -p blkd -p campaign --bins || die "cargo build failed"
# Incremental: a second when nothing changed.
scripts/build-guest-image.sh >/dev/null || die "scripts/build-guest-image.sh failed"
hostd=$target_dir/debug/hostd
campaign=$target_dir/debug/ivha-campaign

# ivha-campaign cleans up after itself unless it is killed: then its pair (state directory
# /dev/shm/ivha-client-vm-PID-SEED) and its client VM (control socket
# $TMPDIR/ivha-client-PID-SEED.sock on its command line) are stopped here.
run_pid=""
cleanup() {
    local status=$? state pid
    # Every step is tried, whatever the one before returned (wait returns the signal's status).
    set +e
    [[ -n $run_pid ]] || exit "$status"
    kill "$run_pid" 2>/dev/null
    wait "$run_pid" 2>/dev/null
    for state in /dev/shm/ivha-client-vm-"$run_pid"-*; do
        [[ -d $state ]] || continue
        IVHA_STATE_DIR=$state "$hostd" down --purge >/dev/null 2>&1 || true
        rm -rf "$state"
    done
    for pid in $(pgrep -x qemu-system-x86); do
        grep -qs "ivha-client-$run_pid-" "/proc/$pid/cmdline" && kill -9 "$pid" 2>/dev/null
    done
    rm -f "${TMPDIR:-/tmp}"/ivha-client-"$run_pid"-*.sock
    exit "$status"
}
trap cleanup INT TERM

"$campaign" client-vm --events "$events" --backend "$backend" --out "$out" --hostd "$hostd" "$@" &
run_pid=$!
status=0
wait "$run_pid" || status=$?
run_pid=""
exit "$status"
