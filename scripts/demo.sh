#!/usr/bin/env bash
# The main job: launch the QEMU pair, look at it, write and read through a node's NBD
# address, show what the NVRAM log keeps when its writer is killed, and shut down.
# (Takeover joins the demo with the takeover issue.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bold "checking dependencies"
scripts/install-deps.sh

bold "building (release) and the guest image"
cargo build --release --quiet -p hostd --bin hostd -p shm --example log-writer
scripts/build-guest-image.sh | tail -n 1
hostd=$PWD/target/release/hostd
writer=$PWD/target/release/examples/log-writer

state=$(mktemp -d /dev/shm/ivha-demo.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    "$hostd" down --purge >/dev/null 2>&1 || true
    rm -rf "$state" "$log_dir"
}
log_dir=$(mktemp -d /dev/shm/ivha-demo-log.XXXXXX)
trap cleanup EXIT
# Ports well away from NBD's 10809, in case a real NBD server runs here. The flusher waits
# 3 s before each batch, so the demo can show writes that are only in the NVRAM log.
printf '[flusher]\ndelay_ms = 3000\n[[node]]\nname = "a"\nnbd_port = 21809\n[[node]]\nname = "b"\nnbd_port = 21810\n' >"$state/ivha.toml"

bold "hostd up --detach  (two QEMU guests sharing NVRAM regions)"
"$hostd" up --detach --config "$state/ivha.toml"

bold "hostd status"
sleep 1
"$hostd" status

bold "hostd inspect b  (b's region, read-only: heartbeat, and what b read in a's region)"
"$hostd" inspect b --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
name, boot, beat = r["header"]["name"], r["boot_id"], r["heartbeat"]["counter"]
peer_boot, peer_beat = r["peer"]["boot_id"], r["peer"]["heartbeat"]
print(f"node {name}: boot id {boot:#x}, heartbeat #{beat}")
print(f"it last read node a (through its read-only mapping) with boot id {peer_boot:#x} at heartbeat #{peer_beat}")
'
"$hostd" inspect a --json | python3 -c '
import json, sys
boot = json.load(sys.stdin)["boot_id"]
print(f"node a, in its own region: boot id {boot:#x}")
'

bold "a client writes 16 blocks through node a's NBD address (qemu-io), then reads them back"
writes=(); reads=()
for i in $(seq 0 15); do
    writes+=(-c "write -P $((i + 1)) $((i * 1048576)) 4k")
    reads+=(-c "read -P $((i + 1)) $((i * 1048576)) 4k")
done
qemu-io -f raw "${writes[@]}" nbd://127.0.0.1:21809/a | grep -c "^wrote" | sed 's/^/blocks written and acknowledged: /'
read_back=$(qemu-io -f raw "${reads[@]}" nbd://127.0.0.1:21809/a)
if grep -q "verification failed" <<<"$read_back"; then
    echo "error: a block read back wrong:"; echo "$read_back"; exit 1
fi
echo "blocks read back, each with its own pattern: $(grep -c '^read' <<<"$read_back")"
"$hostd" inspect a --limit 4 | grep -E "^  (log|records)|^ +[0-9]+ +[0-9]+ write" || true
echo "(acknowledged from the NVRAM log; the flusher puts them on a's disk a few seconds later)"

bold "hostd down"
"$hostd" down

# The NVRAM log on its own: a writer on the host, killed mid-stream.
export IVHA_STATE_DIR=$log_dir
mkdir -p "$log_dir/regions"
region=$log_dir/regions/a.region

bold "node a appends 4 KiB writes to its NVRAM log (the last 64 kept unflushed)"
"$writer" "$region" --flush-lag 64 >"$state/acks" &
pid=$!
sleep 0.3
kill -KILL "$pid"
wait "$pid" 2>/dev/null || true
acked=$(tail -n 1 "$state/acks" | awk '{print $2}')
echo "SIGKILLed the writer; the last write it acknowledged was seq $acked"

bold "hostd inspect a  (the writer is dead; its region is still there)"
"$hostd" inspect a --limit 6 || true

bold "checking that every acknowledged write is in the log"
"$hostd" inspect a --json | python3 -c '
import json, sys
report = json.load(sys.stdin)
acked = int(sys.argv[1])
head, flushed = report["head_seq"], report["flushed_seq"]
seqs = [r["seq"] for r in report["records"] if r["crc_ok"]]
assert report["problem"] is None, report["problem"]
assert head >= acked, f"head {head} is behind acknowledged seq {acked}"
assert seqs == list(range(flushed + 1, head + 1)), "records are not contiguous"
print(f"ok: seqs 1..{flushed} flushed, {flushed + 1}..{head} unflushed with good crcs, "
      f"last acknowledged {acked} <= head {head}")
' "$acked"

bold "a restarted writer resumes the same log"
"$writer" "$region" --count 3 | tail -n 1

bold "a flipped bit in an unflushed record is caught and named"
"$hostd" inspect a --json | python3 -c '
import json, sys
report = json.load(sys.stdin)
geometry, record = report["header"], report["records"][10]
# ring start + place in the ring + record header (32) + write prefix (16) + 100 bytes of data
at = geometry["ring_offset"] + record["pos"] % geometry["ring_size"] + 32 + 16 + 100
with open(sys.argv[1], "r+b") as f:
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0x10]))
seq = record["seq"]
print(f"flipped one bit in the data of record {seq}")
' "$region"
"$hostd" inspect a --limit 0 | grep -E "^  (log|PROBLEM)" || true

bold "done"
echo "Takeover (kill a, b serves a's data at a's address) joins this demo with the next issue."
