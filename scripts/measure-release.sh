#!/usr/bin/env bash
# Measures a planned takeover with a full log: starts a QEMU pair whose flushers are paused,
# writes LOG_MIB of WRITE_KIB writes to a's export (all of it stays in a's NVRAM log), then
# runs `hostd takeover a`. a must flush its whole log to disk before b may serve a's
# identity, so clients of a stall for as long as that flush takes. Prints the flush rate
# (logged bytes / time until a acknowledged the release) and the client stall (from the
# takeover command to the first correct read through a's unchanged address), then checks
# every written byte through that address. Always stops the pair and removes its state
# directory. See docs/takeover-measurements.md.
#
# Environment: LOG_MIB (default 64), WRITE_BYTES (size of each write, default 65536),
# STRIDE_BYTES (from one write's offset to the next, default WRITE_BYTES; e.g. 512-byte
# writes 4096 apart each land on a page of their own),
# TRIALS (default 1; the pair is given back and refilled between trials),
# KEEP_LOGS=DIR (copy hostd.log, events.jsonl and the consoles there at the end).
# Usage: scripts/measure-release.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh
. scripts/lib/eta.sh

log_mib=${LOG_MIB:-64}
write_bytes=${WRITE_BYTES:-65536}
stride=${STRIDE_BYTES:-$write_bytes}
trials=${TRIALS:-1}
die() { echo "measure-release: error: $*" >&2; exit 1; }
now_ns() { date +%s%N; }
((log_mib >= 1 && write_bytes >= 512 && write_bytes % 512 == 0 && (log_mib << 20) % write_bytes == 0)) ||
    die "WRITE_BYTES=$write_bytes must be a multiple of 512 that divides LOG_MIB=$log_mib MiB"
((stride >= write_bytes && stride % 512 == 0)) || die "STRIDE_BYTES=$stride: a multiple of 512, at least WRITE_BYTES"
count=$(((log_mib << 20) / write_bytes))
span_mib=$(((count * stride + (1 << 20) - 1) >> 20))
# The ring must hold the log with room to spare (records may be up to half the ring).
node_mib=1
while ((node_mib < 2 * log_mib)); do node_mib=$((node_mib * 2)); done

nice cargo build --quiet -p hostd -p blkd --bins
nice scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd

state=$(mktemp -d /dev/shm/ivha-release.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    local status=$?
    close_pair "$status" "$hostd" "$state"
}
trap cleanup EXIT

port=$(free_port_pair 23809) || die "no two free ports found"
url=nbd://127.0.0.1:$port/a
cat >"$state/ivha.toml" <<EOF
[flusher]
paused = true
[regions]
node_mib = $node_mib
[disks]
size_mib = $((2 * span_mib < 256 ? 256 : 2 * span_mib))
$(pair_nodes "$port")
EOF

"$hostd" up --detach --config "$state/ivha.toml" >/dev/null
accel=$("$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')
echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"
echo "pair: node regions of $node_mib MiB, flushers paused; log: $log_mib MiB in $count writes of $write_bytes bytes, $stride bytes apart"

# a's head_seq - flushed_seq from `hostd status --json` (nodes[0] comes first).
unflushed_of_a() {
    "$hostd" status --json | awk -F': ' '
        /"head_seq"/ && head == "" { head = $2 + 0 }
        /"flushed_seq"/ && flushed == "" { flushed = $2 + 0 }
        END { print head - flushed }'
}

# One trial: fill a's log with pattern $1, take a over, time it, check the data.
trial() {
    local pattern=$1 writes=() reads=() i out
    for ((i = 0; i < count; i++)); do
        writes+=(-c "write -q -P $pattern $((i * stride)) $write_bytes")
        reads+=(-c "read -q -P $pattern $((i * stride)) $write_bytes")
    done
    local fill_started fill_ms
    fill_started=$(now_ns)
    out=$(qemu-io -f raw "${writes[@]}" "$url" 2>&1) || die "writing to $url failed: $out"
    fill_ms=$((($(now_ns) - fill_started) / 1000000))
    local records
    records=$(unflushed_of_a)
    ((records >= count)) || die "a's log holds $records unflushed records after $count writes: is the flusher paused?"

    # The probe reads the last block written: its bytes are right only once b serves a's
    # identity with a's whole log on disk.
    local last=$(((count - 1) * stride)) report=$state/takeover.json
    local started t1="" probes=0
    started=$(now_ns)
    "$hostd" takeover a --json >"$report" 2>"$state/takeover.err" &
    local move=$!
    while :; do
        probes=$((probes + 1))
        if out=$(timeout 5 qemu-io -f raw -c "read -P $pattern $last $write_bytes" "$url" 2>&1) &&
            ! grep -q "verification failed\|Pattern verification" <<<"$out" &&
            grep -q "^read $write_bytes/" <<<"$out"; then
            t1=$(now_ns)
            break
        fi
        grep -q "verification failed\|Pattern verification" <<<"$out" &&
            die "a read through $url returned wrong bytes during the takeover: $out"
        (($(now_ns) - started < 300 * 1000000000)) || die "no good read within 300 s"
        sleep 0.01
    done
    wait "$move" || die "hostd takeover a failed: $(cat "$state/takeover.err")"
    local released stall_ms
    released=$(sed -n 's/^ *"released": \([0-9.]*\),\{0,1\}$/\1/p' "$report" | head -n 1)
    [[ -n $released ]] || die "no released time in the takeover report: $(cat "$report")"
    stall_ms=$(((t1 - started) / 1000000))
    awk -v mib="$log_mib" -v ms="$released" -v stall="$stall_ms" -v records="$records" \
        -v probes="$probes" -v fill="$fill_ms" 'BEGIN {
        printf "log %d MiB (%d records, filled in %.1f s): released after %.0f ms = flush at %.1f MB/s; client stall %d ms (%d probes)\n",
            mib, records, fill / 1000, ms, mib * 1048576 / 1e6 / (ms / 1000), stall, probes
    }'
    # Every byte, through a's address (b serves it now).
    out=$(qemu-io -f raw "${reads[@]}" "$url" 2>&1) || die "read-back failed: $out"
    grep -q "verification failed\|Pattern verification" <<<"$out" && die "read-back: wrong bytes: $out"
    "$hostd" giveback a >/dev/null || die "hostd giveback a failed"
}

eta_start measure-release trials "$trials"
for ((t = 0; t < trials; t++)); do
    trial $((0x41 + t))
    eta_step $((t + 1))
done
