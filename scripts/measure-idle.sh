#!/usr/bin/env bash
# Measures what an idle cluster costs the host: starts a QEMU pair (NODES=N: N nodes) with
# the default settings, waits until every node serves and SETTLE_S more, then samples each
# QEMU process's CPU time (utime + stime from /proc, all threads) over DURATION_S and prints
# it as a percentage of one core per guest, with a breakdown by thread name (vCPU thread,
# main loop, I/O workers), and its memory: resident and proportional set size (a page shared
# by k processes counts 1/k in each: the regions), and how many regions it maps (its own,
# the control region, and those of the nodes it may take over). No client is connected and
# nothing is written. Always stops the cluster and removes its state directory. See
# docs/takeover-measurements.md.
#
# Environment: NODES (2 to 8, default 2), DURATION_S (default 60), SETTLE_S (default 5),
# KERNEL_ARGS (appended to every guest's kernel command line, to try settings), KEEP_LOGS=DIR.
# Usage: scripts/measure-idle.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

nodes_wanted=${NODES:-2}
duration=${DURATION_S:-60}
settle=${SETTLE_S:-5}
die() { echo "measure-idle: error: $*" >&2; exit 1; }
((duration >= 1)) || die "DURATION_S=$duration: at least 1"
[[ $nodes_wanted =~ ^[2-8]$ ]] || die "NODES=$nodes_wanted: 2 to 8 nodes"

nice cargo build --quiet -p hostd -p blkd --bins
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

port=$(free_ports "$nodes_wanted" 24809) || die "no $nodes_wanted free ports found"
cat >"$state/ivha.toml" <<EOF
[qemu]
kernel_args = "${KERNEL_ARGS:-}"
$(cluster_nodes "$port" "$nodes_wanted")
EOF
"$hostd" up --detach --config "$state/ivha.toml" >/dev/null
sleep "$settle"

# "name pid" per node, from `hostd status --json`.
mapfile -t nodes < <("$hostd" status --json | awk -F'"' '
    /"name":/ && name == "" { name = $4 }
    /"pid":/ && name != "" { pid = $3; gsub(/[^0-9]/, "", pid); print name, pid; name = "" }')
((${#nodes[@]} == nodes_wanted)) || die "expected $nodes_wanted nodes with a pid in hostd status, got: ${nodes[*]}"
accel=$("$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')
echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"
echo "idle cluster of $nodes_wanted nodes, no clients; sampling ${duration} s after ${settle} s of settling${KERNEL_ARGS:+; kernel args: $KERNEL_ARGS}"

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
    # kB figures from the kernel's rollup of every mapping.
    read -r rss pss pss_shmem < <(awk '/^Rss:/ { r = $2 } /^Pss:/ { p = $2 } /^Pss_Shmem:/ { s = $2 }
        END { print r, p, s }' "/proc/$pid/smaps_rollup")
    regions=$(grep -c '/regions/.*\.region' "/proc/$pid/maps" || true)
    awk -v r="$rss" -v p="$pss" -v s="$pss_shmem" -v k="$regions" 'BEGIN {
        printf "  memory: RSS %.1f MiB, PSS %.1f MiB (shared memory %.1f MiB), %d regions mapped\n",
            r / 1024, p / 1024, s / 1024, k }'
    # The idle-cost target of the takeover issue: at most 5 % of a core per guest.
    if awk -v u="$total" -v hz="$ticks" -v d="$duration" 'BEGIN { exit !(100 * u / hz / d > 5) }'; then
        echo "  target (at most 5 % of a core): MISSED"
    else
        echo "  target (at most 5 % of a core): met"
    fi
    unset after
done
