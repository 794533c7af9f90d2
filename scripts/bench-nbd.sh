#!/usr/bin/env bash
# NBD benchmark: 4 KiB random writes and reads at queue depth 1 and 16, measured with fio's
# NBD engine (libnbd) against, in one run:
#   ivha         the guest agent in process mode (hostd up --backend process), default
#                configuration: a write leaves the NVRAM log once in the host's page cache
#                (flusher.release = "host"), disks synced to media every second
#   ivha-media   the same with flusher.release = "media": a write leaves the log only once
#                fdatasynced, so sustained write IOPS are bounded by the disk
#   nbdkit-file  nbdkit's file plugin on an image in the same directory (same disk)
#   nbdkit-mem   nbdkit's memory plugin (RAM only: nothing survives anything)
# Each workload runs on the four servers in turn, ROUNDS times (default 3), and the median is
# reported: single runs on a small machine vary by tens of percent.
# Usage: scripts/bench-nbd.sh [SECONDS_PER_RUN [ROUNDS]]   (default 4 and 3; IVHA_BENCH_DIR: where images go)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib/pair.sh
. scripts/lib/pair.sh
. scripts/lib/target.sh
. scripts/lib/bench.sh

runtime=${1:-4}
rounds=${2:-3}
for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build --release --quiet -p hostd --bin hostd -p blkd --bin ivha-blkd -p guest-agent --bin guest-agent
hostd=$target_dir/release/hostd

work=${IVHA_BENCH_DIR:-$target_dir/bench-nbd}
mkdir -p "$work"
# Everything the run writes goes here and goes when it ends.
images=$(mktemp -d "$work/run.XXXXXX")
states=()
pids=()
cleanup() {
    for state in "${states[@]}"; do
        end_pair 0 "$hostd" "$state" 0
        rm -rf "$state" "$state.toml"
    done
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$images"
}
trap cleanup EXIT

# Three pairs of ports: ivha's nodes a and b, ivha-media's, and the two nbdkit servers.
port_ivha=$(free_port_pair 22809) || { echo "error: no free ports" >&2; exit 1; }
port_media=$(free_port_pair $((port_ivha + 2))) || { echo "error: no free ports" >&2; exit 1; }
port_file=$(free_port_pair $((port_media + 2))) || { echo "error: no free ports" >&2; exit 1; }
port_mem=$((port_file + 1))
size=1G

start_pair() { # PORT RELEASE: a process-mode pair whose nodes a and b serve on PORT and PORT+1
    local state
    state=$(mktemp -d /dev/shm/ivha-bench-nbd.XXXXXX)
    states+=("$state")
    mkdir -p "$images/$2"
    cat >"$state.toml" <<TOML
backend = "process"
[regions]
node_mib = 64
[disks]
size_mib = 1024
dir = "$images/$2"
[flusher]
release = "$2"
[[node]]
name = "a"
nbd_port = $1
[[node]]
name = "b"
nbd_port = $(($1 + 1))
TOML
    IVHA_STATE_DIR=$state "$hostd" up --detach --config "$state.toml" >/dev/null
}
start_pair "$port_ivha" host
start_pair "$port_media" media
truncate -s "$size" "$images/nbdkit-file.img"
nbdkit --exit-with-parent -f -p "$port_file" -i 127.0.0.1 file "$images/nbdkit-file.img" &
pids+=($!)
nbdkit --exit-with-parent -f -p "$port_mem" -i 127.0.0.1 memory "$size" &
pids+=($!)
sleep 0.5

echo "ivha NBD benchmark: fio $(fio --version | cut -d- -f2), nbd engine, 4 KiB random I/O, ${runtime} s per run, median of $rounds rounds"
echo "  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
echo "  images in $images ($(stat -f -c %T "$images")); ivha's regions on /dev/shm"
echo
uri_of() {
    case $1 in
    ivha) echo "nbd://127.0.0.1:$port_ivha/a" ;;
    ivha-media) echo "nbd://127.0.0.1:$port_media/a" ;;
    nbdkit-file) echo "nbd://127.0.0.1:$port_file/" ;;
    nbdkit-mem) echo "nbd://127.0.0.1:$port_mem/" ;;
    esac
}
server_iops() { fio_iops "$(uri_of "$1")" "$2" "$3"; }

declare -A iops
bench_rounds ivha ivha-media nbdkit-file nbdkit-mem
printf '%-14s %10s %11s %12s %11s   %-9s %-9s %-11s\n' "workload" "ivha" "ivha-media" "nbdkit-file" \
    "nbdkit-mem" "ivha/file" "ivha/mem" "media/file"
for rw in randwrite randread; do
    for depth in 1 16; do
        a=${iops[ivha.$rw.$depth]}; d=${iops[ivha-media.$rw.$depth]}
        f=${iops[nbdkit-file.$rw.$depth]}; m=${iops[nbdkit-mem.$rw.$depth]}
        printf '%-14s %10s %11s %12s %11s   %-9s %-9s %-11s\n' "$rw qd$depth" "$a" "$d" "$f" "$m" \
            "$(ratio "$a" "$f")" "$(ratio "$a" "$m")" "$(ratio "$d" "$f")"
    done
done
echo
echo "IOPS (higher is better). Targets: ivha writes >= nbdkit-file (1.00x) and >= 0.8x nbdkit-mem."
echo "ivha acknowledges a write once it is in the NVRAM log, which survives a crash of the agent, guest"
echo "or hostd; nbdkit-file once it is in the page cache (survives a crash of nbdkit); nbdkit-mem once"
echo "it is in RAM (survives nothing). On a host crash ivha loses what was not synced yet (the last"
echo "one to few seconds), ivha-media only its unflushed log, nbdkit-file up to the kernel's writeback"
echo "delay (30 s by default)."
