#!/usr/bin/env bash
# NBD benchmark: 4 KiB random writes and reads at queue depth 1 and 16, measured with fio's
# NBD engine (libnbd) against, in one run:
#   ivha         the guest agent in process mode (hostd up --backend process): NVRAM write-back
#   nbdkit-file  nbdkit's file plugin on an image in the same directory (same disk)
#   nbdkit-mem   nbdkit's memory plugin (RAM only: nothing survives anything)
# Each workload runs on the three servers in turn, ROUNDS times (default 3), and the median is
# reported: single runs on a small machine vary by tens of percent.
# Usage: scripts/bench-nbd.sh [SECONDS_PER_RUN [ROUNDS]]   (default 4 and 3; IVHA_BENCH_DIR: where images go)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runtime=${1:-4}
rounds=${2:-3}
for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build --release --quiet -p hostd --bin hostd -p guest-agent --bin guest-agent
hostd=$PWD/target/release/hostd

work=${IVHA_BENCH_DIR:-$PWD/target/bench-nbd}
state=$(mktemp -d /dev/shm/ivha-bench-nbd.XXXXXX)
mkdir -p "$work"
rm -f "$work"/*.img
pids=()
cleanup() {
    IVHA_STATE_DIR=$state "$hostd" down --purge >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$state" "$work"/*.img
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_a=$(free_port); port_b=$(free_port); port_file=$(free_port); port_mem=$(free_port)
size=1G

cat >"$state.toml" <<TOML
backend = "process"
[regions]
node_mib = 64
[disks]
size_mib = 1024
dir = "$work"
[[node]]
name = "a"
nbd_port = $port_a
[[node]]
name = "b"
nbd_port = $port_b
TOML
IVHA_STATE_DIR=$state "$hostd" up --detach --config "$state.toml" >/dev/null
truncate -s "$size" "$work/nbdkit-file.img"
nbdkit --exit-with-parent -f -p "$port_file" -i 127.0.0.1 file "$work/nbdkit-file.img" &
pids+=($!)
nbdkit --exit-with-parent -f -p "$port_mem" -i 127.0.0.1 memory "$size" &
pids+=($!)
sleep 0.5

fio_iops() { # URI RW DEPTH
    fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth="$3" \
        --size="$size" --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["write"]["iops"] + j["read"]["iops"]))'
}

echo "ivha NBD benchmark: fio $(fio --version | cut -d- -f2), nbd engine, 4 KiB random I/O, ${runtime} s per run, median of $rounds rounds"
echo "  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) cores)"
echo "  images in $work ($(stat -f -c %T "$work")); ivha's region on /dev/shm"
echo
uri_of() {
    case $1 in
    ivha) echo "nbd://127.0.0.1:$port_a/a" ;;
    nbdkit-file) echo "nbd://127.0.0.1:$port_file/" ;;
    nbdkit-mem) echo "nbd://127.0.0.1:$port_mem/" ;;
    esac
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A iops
# Writes first: reads then find data everywhere (a fresh sparse image reads as holes).
for rw in randwrite randread; do
    for depth in 1 16; do
        declare -A samples=()
        for round in $(seq 1 "$rounds"); do
            for server in ivha nbdkit-file nbdkit-mem; do
                samples[$server]+="$(fio_iops "$(uri_of $server)" "$rw" "$depth") "
            done
        done
        for server in ivha nbdkit-file nbdkit-mem; do
            # shellcheck disable=SC2086 # word splitting wanted
            iops[$server.$rw.$depth]=$(median ${samples[$server]})
            echo "  $rw qd$depth $server: ${samples[$server]}" >&2
        done
        unset samples
    done
done
echo >&2

printf '%-14s %12s %12s %12s   %-10s %-10s\n' "workload" "ivha" "nbdkit-file" "nbdkit-mem" "ivha/file" "ivha/mem"
for rw in randwrite randread; do
    for depth in 1 16; do
        a=${iops[ivha.$rw.$depth]}; f=${iops[nbdkit-file.$rw.$depth]}; m=${iops[nbdkit-mem.$rw.$depth]}
        printf '%-14s %12s %12s %12s   %-10s %-10s\n' "$rw qd$depth" "$a" "$f" "$m" \
            "$(python3 -c "print(f'{$a/$f:.2f}x')")" "$(python3 -c "print(f'{$a/$m:.2f}x')")"
    done
done
echo
echo "IOPS (higher is better). Targets: ivha writes >= nbdkit-file (1.00x) and >= 0.8x nbdkit-mem."
echo "ivha acknowledges a write once it is in the NVRAM log; nbdkit-file once it is in the page cache;"
echo "nbdkit-mem once it is in RAM. Only ivha's acknowledged writes survive a crash of the server process."
