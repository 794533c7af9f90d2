#!/usr/bin/env bash
# NBD through a guest, bridge mode against user mode, in one run: 4 KiB random writes and
# reads at queue depth 1 and 16, measured with fio's NBD engine (libnbd) against export a of
#   user    a QEMU pair with QEMU user networking (the default): the client connects to
#           127.0.0.1:NBD_PORT and QEMU forwards to the guest (slirp)
#   bridge  the same pair configuration in bridge mode: each guest has a virtio NIC on a tap
#           on a bridge in a network namespace hostd makes; fio runs in that namespace
#           (`ip netns exec`) against nbd://10.77.0.11:10809/a
# Both pairs are up for the whole run; each workload runs on the two in turn, ROUNDS times,
# and the median is reported with bridge/user. Needs root (bridge mode makes a namespace,
# a bridge and taps). Always stops both pairs and removes their state (and the namespace).
#
# Environment: HOSTD (a hostd binary; default: build target/release/hostd and the guest
# image), IVHA_GUEST_DIR (the guest image hostd boots), KEEP_LOGS=DIR (copy both pairs'
# hostd.log, events.jsonl and consoles there at the end).
# Usage: scripts/bench-bridge.sh [SECONDS_PER_RUN [ROUNDS]]   (default 4 and 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh
. scripts/lib/bench.sh

runtime=${1:-4}
rounds=${2:-3}
die() { echo "bench-bridge: error: $*" >&2; exit 1; }
[[ $runtime =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [SECONDS_PER_RUN [ROUNDS]]"
((EUID == 0)) || die "needs root: bridge mode makes a network namespace, a bridge and taps"
for tool in fio ip python3; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done
release_hostd

tag=$$
netns=ivbench-$tag bridge=ivbn$((tag % 100000))
[[ ! -e /run/netns/$netns ]] || die "network namespace $netns exists already"
states=()
cleanup() {
    local status=$? state kind
    for state in "${states[@]}"; do
        end_pair "$status" "$hostd" "$state" 20
        if [[ -n ${KEEP_LOGS:-} ]]; then
            kind=$(basename "$state" | cut -d. -f2)
            mkdir -p "$KEEP_LOGS/$kind"
            cp -r "$state/hostd.log" "$state/events.jsonl" "$state/consoles" "$KEEP_LOGS/$kind/" 2>/dev/null || true
        fi
        rm -rf "$state"
    done
    [[ ! -e /run/netns/$netns ]] || ip netns del "$netns" 2>/dev/null || true
    [[ -z ${KEEP_LOGS:-} ]] || echo "logs kept in $KEEP_LOGS" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(free_ports 4 22809) || die "no free ports"
size=1G
# start_pair KIND NETWORK NODES: a QEMU pair with the [network] section NETWORK and the
# [[node]] sections NODES; its state directory in $started.
start_pair() {
    started=$(mktemp -d "/dev/shm/ivha-bench-bridge.$1.XXXXXX")
    states+=("$started")
    cat >"$started/ivha.toml" <<EOF
$2
[metrics]
enabled = false
[disks]
size_mib = 1024
$3
EOF
    IVHA_STATE_DIR=$started "$hostd" up --detach --config "$started/ivha.toml" >/dev/null ||
        die "the $1-mode pair did not start"
}
start_pair user "" "$(pair_nodes "$port")"
state_user=$started
start_pair bridge "[network]
mode = \"bridge\"
bridge = \"$bridge\"
netns = \"$netns\"
bridge_address = \"10.77.0.1/24\"" "[[node]]
name = \"a\"
nbd_port = $((port + 2))
address = \"10.77.0.2/24\"
service_ip = \"10.77.0.11/24\"
[[node]]
name = \"b\"
nbd_port = $((port + 3))
address = \"10.77.0.3/24\"
service_ip = \"10.77.0.12/24\""
accel=$(IVHA_STATE_DIR=$state_user "$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')

server_iops() { # MODE RW DEPTH
    if [[ $1 == bridge ]]; then
        fio_iops nbd://10.77.0.11:10809/a "$2" "$3" ip netns exec "$netns"
    else
        fio_iops "nbd://127.0.0.1:$port/a" "$2" "$3"
    fi
}

echo "ivha NBD through a guest, bridge mode against user mode: fio $(fio --version | cut -d- -f2), nbd engine,"
echo "4 KiB random I/O on export a, ${runtime} s per run (1 s ramp), median of $rounds rounds"
echo "  machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"
echo "  user:   nbd://127.0.0.1:$port/a (QEMU user networking)"
echo "  bridge: nbd://10.77.0.11:10809/a from namespace $netns (virtio-net on a tap on bridge $bridge)"
echo
declare -A iops
bench_rounds user bridge
compare_table user bridge
echo "(four guests; the idle pair takes a little CPU from the one measured, alike for both modes)."
