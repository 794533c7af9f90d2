#!/usr/bin/env bash
# Measures takeover time: starts a QEMU cluster (a pair; NODES=N for N nodes) whose flushers
# are paused, then runs
# `ivha-campaign measure-takeover`, which kills node a TRIALS times (SIGKILL) for each size in
# UNFLUSHED_MIB (MiB of unflushed writes in a's log; the first is the baseline) and
# HANG_TRIALS times (SIGSTOP), and prints p50/p99/max of kill-to-first-successful-read
# through a's address, the takeover's timeline and each size's ratio to the first. Always
# stops the pair and removes its state directory. See docs/takeover-measurements.md.
#
# Environment: NODES (2 to 8, default 2), TRIALS (default 10), HANG_TRIALS (3), UNFLUSHED_MIB (0,16,64),
# TIMEOUT_MS (heartbeat timeout, default 3000), KEEP_LOGS=DIR (copy hostd.log, events.jsonl
# and the consoles there before the state directory is removed), FIGURES=DIR (where the SVG
# figures go: a timeline per trial and every trial's kill → first read; default
# $CARGO_TARGET_DIR/measure-takeover). Progress (a bar on a terminal) goes to stderr.
# Usage: [TRIALS=N] scripts/measure-takeover.sh [extra measure-takeover arguments]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

nodes=${NODES:-2}
trials=${TRIALS:-10}
hang_trials=${HANG_TRIALS:-3}
unflushed_mib=${UNFLUSHED_MIB:-0,16,64}
timeout_ms=${TIMEOUT_MS:-3000}
figures=${FIGURES:-$target_dir/measure-takeover}
die() { echo "measure-takeover: error: $*" >&2; exit 1; }
[[ $nodes =~ ^[2-8]$ ]] || die "NODES=$nodes: 2 to 8 nodes"

cargo build --quiet -p hostd -p blkd -p guest-agent -p campaign --bins
# Incremental: a second when nothing changed; an image from another build of the agent
# would not read this hostd's settings.
scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd
campaign=$target_dir/debug/ivha-campaign

state=$(mktemp -d /dev/shm/ivha-takeover.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    local status=$?
    close_pair "$status" "$hostd" "$state"
}
trap cleanup EXIT

# Free ports next to each other, away from NBD's 10809.
port=$(free_ports "$nodes" 22809) || die "no $nodes free ports found"
# The flushers are paused, so each trial's writes are all in a's log when a dies and b
# must replay them. A 128 MiB region holds a ring of 128 MiB - 4 KiB with records of up to
# half of it: 64 MiB of 1 MiB writes (plus their headers) fits with room to spare.
config=$state/ivha.toml
cat >"$config" <<EOF
[flusher]
paused = true
[regions]
node_mib = 128
[disks]
size_mib = 256
[heartbeat]
interval_ms = 100
timeout_ms = $timeout_ms
$(cluster_nodes "$port" "$nodes")
EOF

"$hostd" up --detach --config "$config" >/dev/null
accel=$("$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')
echo "cluster: $nodes nodes; machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"

"$campaign" measure-takeover --hostd "$hostd" --timeout-ms "$timeout_ms" --trials "$trials" \
    --hang-trials "$hang_trials" --unflushed-mib "$unflushed_mib" --figures "$figures" "$@"
