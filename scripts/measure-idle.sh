#!/usr/bin/env bash
# Measures what an idle pair costs the host: starts a QEMU pair with the default settings,
# waits until both nodes serve and SETTLE_S more, then samples each QEMU process's CPU time
# (utime + stime from /proc, all threads) over DURATION_S and prints it as a percentage of
# one core per guest, with a breakdown by thread name (vCPU thread, main loop, I/O workers).
# No client is connected and nothing is written. Always stops the pair and removes its
# state directory. See docs/takeover-measurements.md.
#
# Environment: DURATION_S (default 60), SETTLE_S (default 5), KERNEL_ARGS (appended to
# both guests' kernel command line, to try settings), KEEP_LOGS=DIR.
# Usage: scripts/measure-idle.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

duration=${DURATION_S:-60}
settle=${SETTLE_S:-5}
die() { echo "measure-idle: error: $*" >&2; exit 1; }
((duration >= 1)) || die "DURATION_S=$duration: at least 1"

nice cargo build --quiet -p hostd --bins
nice scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd
ticks=$(getconf CLK_TCK)

state=$(mktemp -d /dev/shm/ivha-idle.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    local status=$?
    close_pair "$status" "$hostd" "$state"
}
trap cleanup EXIT

port=$(free_port_pair 24809) || die "no two free ports found"
cat >"$state/ivha.toml" <<EOF
[qemu]
kernel_args = "${KERNEL_ARGS:-}"
$(pair_nodes "$port")
EOF
"$hostd" up --detach --config "$state/ivha.toml" >/dev/null
sleep "$settle"

# "name pid" per node, from `hostd status --json`.
mapfile -t nodes < <("$hostd" status --json | awk -F'"' '
    /"name":/ && name == "" { name = $4 }
    /"pid":/ && name != "" { pid = $3; gsub(/[^0-9]/, "", pid); print name, pid; name = "" }')
((${#nodes[@]} == 2)) || die "expected two nodes with a pid in hostd status, got: ${nodes[*]}"
accel=$("$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')
echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"
echo "idle pair, no clients; sampling ${duration} s after ${settle} s of settling${KERNEL_ARGS:+; kernel args: $KERNEL_ARGS}"

# Prints "THREAD-NAME TICKS" for each thread of process $1 (utime + stime). The name is
# in parentheses and may hold spaces ("CPU 0/TCG"), so the fields are counted after it.
thread_ticks() {
    local task stat name rest
    for task in /proc/"$1"/task/*; do
        stat=$(cat "$task/stat" 2>/dev/null) || continue
        name=${stat#*(}
        name=${name%)*}
        rest=${stat##*) }
        # rest starts at field 3 (state): utime and stime are fields 14 and 15.
        read -r -a f <<<"$rest"
        echo "${name// /_} $((f[11] + f[12]))"
    done
}

declare -A before
for node in "${nodes[@]}"; do
    read -r name pid <<<"$node"
    while read -r thread t; do
        before[$name/$thread]=$((${before[$name/$thread]:-0} + t))
    done < <(thread_ticks "$pid")
done
sleep "$duration"
for node in "${nodes[@]}"; do
    read -r name pid <<<"$node"
    [[ -d /proc/$pid ]] || die "node $name's QEMU (pid $pid) exited during the measurement"
    declare -A after=()
    while read -r thread t; do
        after[$thread]=$((${after[$thread]:-0} + t))
    done < <(thread_ticks "$pid")
    total=0 breakdown=""
    for thread in $(printf '%s\n' "${!after[@]}" | sort); do
        used=$((after[$thread] - ${before[$name/$thread]:-0}))
        total=$((total + used))
        ((used > 0)) && breakdown+=$(awk -v t="$thread" -v u="$used" -v hz="$ticks" -v d="$duration" \
            'BEGIN { printf "  %-20s %5.1f %%\n", t, 100 * u / hz / d }')$'\n'
    done
    awk -v n="$name" -v pid="$pid" -v u="$total" -v hz="$ticks" -v d="$duration" 'BEGIN {
        printf "node %s (QEMU pid %d): %.1f %% of a core (%.2f s of CPU in %d s)\n", n, pid, 100 * u / hz / d, u / hz, d }'
    printf '%s' "$breakdown"
    # The idle-cost target of the takeover issue: at most 5 % of a core per guest.
    if awk -v u="$total" -v hz="$ticks" -v d="$duration" 'BEGIN { exit !(100 * u / hz / d > 5) }'; then
        echo "  target (at most 5 % of a core): MISSED"
    else
        echo "  target (at most 5 % of a core): met"
    fi
    unset after
done
