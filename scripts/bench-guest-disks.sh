#!/usr/bin/env bash
# NBD through a guest, its disks served by the storage daemon against QEMU's own virtio-blk,
# in one run: 4 KiB random writes and reads at queue depth 1 and 16, measured with fio's NBD
# engine (libnbd) against export a of
#   qemu   a QEMU pair whose guests open the disk images themselves (disks.served_by = "qemu",
#          what ivha did before the storage daemon)
#   blkd   the same pair configuration with the disks served by ivha-blkd over
#          vhost-user-blk (disks.served_by = "blkd", the default)
# A write is acknowledged from the NVRAM log either way; the disk path carries the flusher's
# writes and the reads of flushed data. Both pairs are up for the whole run; each workload
# runs on the two in turn, ROUNDS times, and the median is reported with blkd/qemu. (The
# daemon against QEMU inside one guest, without NBD: scripts/bench-storage.sh.)
#
# Environment: HOSTD (a hostd binary; default: build target/release/hostd, ivha-blkd and the
# guest image), IVHA_GUEST_DIR (the guest image hostd boots).
# Usage: scripts/bench-guest-disks.sh [SECONDS_PER_RUN [ROUNDS]]   (default 4 and 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh
. scripts/lib/bench.sh

runtime=${1:-4}
rounds=${2:-3}
die() { echo "bench-guest-disks: error: $*" >&2; exit 1; }
[[ $runtime =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] || die "usage: $0 [SECONDS_PER_RUN [ROUNDS]]"
for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done
release_hostd

states=()
cleanup() {
    local status=$? state
    for state in "${states[@]}"; do
        end_pair "$status" "$hostd" "$state" 20
        rm -rf "$state"
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(free_ports 4 23809) || die "no free ports"
size=1G
# start_pair SERVED_BY PORT: a QEMU pair whose disks SERVED_BY serves, nodes on PORT, PORT+1.
start_pair() {
    local state
    state=$(mktemp -d "/dev/shm/ivha-bench-disks.$1.XXXXXX")
    states+=("$state")
    cat >"$state/ivha.toml" <<TOML
[metrics]
enabled = false
[disks]
size_mib = 1024
served_by = "$1"
$(pair_nodes "$2")
TOML
    IVHA_STATE_DIR=$state "$hostd" up --detach --config "$state/ivha.toml" >/dev/null ||
        die "the pair with disks served by $1 did not start"
}
start_pair qemu "$port"
start_pair blkd "$((port + 2))"
accel=$(IVHA_STATE_DIR=${states[0]} "$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')

server_iops() { # SERVED_BY RW DEPTH
    if [[ $1 == blkd ]]; then
        fio_iops "nbd://127.0.0.1:$((port + 2))/a" "$2" "$3"
    else
        fio_iops "nbd://127.0.0.1:$port/a" "$2" "$3"
    fi
}

echo "ivha NBD through a guest, disks by the storage daemon against QEMU's virtio-blk: fio $(fio --version | cut -d- -f2),"
echo "nbd engine, 4 KiB random I/O on export a, ${runtime} s per run (1 s ramp), median of $rounds rounds"
echo "  machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel ${accel:-unknown}"
echo "  qemu: nbd://127.0.0.1:$port/a (disks.served_by = \"qemu\")"
echo "  blkd: nbd://127.0.0.1:$((port + 2))/a (disks.served_by = \"blkd\")"
echo
declare -A iops
bench_rounds qemu blkd
compare_table qemu blkd
echo "(four guests; the idle pair takes a little CPU from the one measured, alike for both)."
echo "Reproduce: scripts/bench-guest-disks.sh $runtime $rounds"
