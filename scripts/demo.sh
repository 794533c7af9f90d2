#!/usr/bin/env bash
# The main job: on a fresh machine, install what is missing and build; launch the QEMU pair;
# write data through node a; kill a; show the takeover timeline and a's NVRAM log; read the
# data back through a's unchanged address (node b serves it now); give a's identity back;
# kill hostd and start it again (it adopts the running pair); shut down. Tool output is captured and shown only when something fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
n=0
step() { n=$((n + 1)); printf '\n%s%d. %s%s\n' "$bold" "$n" "$*" "$plain"; }
die() { echo "demo: error: $*" >&2; exit 1; }
# Runs a command with its output captured; shows the output only if the command fails.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "failed: $*"
    fi
    printf '%s' "$out"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

step "dependencies (a fresh machine: installs what is missing)"
out=$(quiet scripts/install-deps.sh)
echo "${out##*$'\n'}"

step "build (release) and the guest image (the first time takes a few minutes)"
quiet cargo build --release -p hostd --bin hostd -p blkd --bin ivha-blkd >/dev/null
out=$(quiet scripts/build-guest-image.sh)
echo "${out##*$'\n'}"
hostd=$target_dir/release/hostd

state=$(mktemp -d /dev/shm/ivha-demo.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    local status=$?
    end_pair "$status" "$hostd" "$state" 15
    rm -rf "$state"
}
trap cleanup EXIT

# Two free ports, well away from NBD's 10809 in case a real NBD server runs here.
port=$(free_port_pair 21809) || die "no two free ports found"
url=nbd://127.0.0.1:$port/a
# The flushers are paused: every write stays in its node's NVRAM log, so when a dies its
# writes exist only in a's log, and b must replay them.
cat >"$state/ivha.toml" <<EOF
[flusher]
paused = true
[[node]]
name = "a"
nbd_port = $port
[[node]]
name = "b"
nbd_port = $((port + 1))
EOF

# The status of node a (nodes[0]) from `hostd status --json`: field $1.
status_of_a() {
    "$hostd" status --json | sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n 1
}

# Reads every pattern written so far through a's address and checks it byte for byte.
# Pattern i is 64 KiB of byte 0xa0+i at offset i * 64 KiB.
patterns=0
verify() {
    local reads=() out failures rc=0
    for ((i = 0; i < patterns; i++)); do
        reads+=(-c "read -P $((0xa0 + i)) $((i * 65536)) 64k")
    done
    out=$(qemu-io -f raw "${reads[@]}" "$url" 2>&1) || rc=$?
    if ((rc != 0)) || grep -q "verification failed" <<<"$out" ||
        (($(grep -c '^read 65536/65536' <<<"$out") != patterns)); then
        # The failures only (qemu-io names each bad block's offset), else everything.
        failures=$(grep -v -e '^read 65536/65536' -e ' ops; ' <<<"$out" || true)
        printf '%s\n' "${failures:-$out}" >&2
        die "reading back through $url failed (above: which block, which offset)"
    fi
    echo "ok: all $patterns patterns read back byte for byte through $url ($1)"
}
write_pattern() {
    local i=$1
    quiet qemu-io -f raw -c "write -P $((0xa0 + i)) $((i * 65536)) 64k" "$url" >/dev/null
    patterns=$((i + 1))
}

step "hostd up --detach  (two QEMU guests sharing NVRAM regions; flushers paused)"
out=$(quiet "$hostd" up --detach --config "$state/ivha.toml")
echo "${out##*$'\n'}"
# Until each node's partner has read its region since it booted (for a clean status).
for _ in $(seq 100); do
    (($("$hostd" status --json | grep -c 'is up and reads its region"') == 2)) && break
    sleep 0.1
done
"$hostd" status

step "a client writes 16 distinct 64 KiB patterns through a's address, $url"
writes=()
for i in $(seq 0 15); do
    writes+=(-c "write -P $((0xa0 + i)) $((i * 65536)) 64k")
done
out=$(quiet qemu-io -f raw "${writes[@]}" "$url")
acked=$(grep -c '^wrote 65536/65536' <<<"$out" || true)
((acked == 16)) || die "only $acked of 16 writes were acknowledged"
patterns=16
echo "16 writes acknowledged (bytes 0xa0..0xaf at offsets 0, 64 KiB, ... 960 KiB)"
echo "a's log: head seq $(status_of_a head_seq), flushed seq $(status_of_a flushed_seq): they are only in a's NVRAM log"

step "hostd kill a  (SIGKILL a's QEMU, mid-service)"
killed_at=$(now_ms)
out=$("$hostd" kill a)
echo "${out%%$'\n'*}"
served_by=""
while [[ $served_by != b ]]; do
    (($(now_ms) - killed_at < 30000)) || die "b did not take a over within 30 s"
    sleep 0.05
    served_by=$(status_of_a served_by)
done
echo "b serves a's identity $(($(now_ms) - killed_at)) ms after the kill (as seen by polling hostd status)"

step "hostd events --node a --last 3  (the takeover timeline)"
"$hostd" events --node a --last 3

step "hostd inspect a --limit 5  (the dead node's region: its unflushed log, which b replayed)"
"$hostd" inspect a --limit 5

step "read back through a's unchanged address (b serves it now)"
verify "served by b"
write_pattern 16
echo "one more write through $url, into b's log: pattern 0xb0 at 1 MiB"

step "hostd giveback a  (restart a; b flushes and releases a's identity; a serves again)"
"$hostd" giveback a
verify "served by a again"

step "kill -9 hostd  (the guests serve on without it; a restarted hostd adopts them)"
hostd_pid=$("$hostd" status --json | sed -n 's/^ *"hostd_pid": \([0-9]*\),$/\1/p')
[[ -n $hostd_pid ]] || die "hostd status shows no hostd pid"
kill -KILL "$hostd_pid"
while [[ -e /proc/$hostd_pid ]] && ! grep -q ') Z ' "/proc/$hostd_pid/stat" 2>/dev/null; do
    sleep 0.02
done
echo "hostd (pid $hostd_pid) killed; no hostd runs now, so no takeover could happen"
write_pattern 17
verify "no hostd running"
out=$(quiet "$hostd" up --detach)
echo "${out##*$'\n'}"

step "hostd status"
"$hostd" status

step "hostd down --purge"
"$hostd" down --purge
