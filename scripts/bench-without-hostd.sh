#!/usr/bin/env bash
# Failover without hostd against failover by hostd, in one run, in bridge mode (issue 19's
# first target): a QEMU pair on a bridge in a network namespace hostd makes, each node with a
# service IP; a client in that namespace reads through a's service IP (10.79.0.11). Each
# trial times, from the SIGKILL of a's QEMU to the first good read through a's service IP:
#   hostd-driven   hostd runs: it sees a's QEMU die and has b take a over. Then
#                  `hostd giveback a` (which boots a again first).
#   without hostd  hostd is SIGKILLed first, and the script waits until the agents take it
#                  for absent (ABSENT_WAIT_MS, default hostd_absent_ms + 1000); then a's QEMU
#                  is SIGKILLed: b finds a dead (its heartbeat silent for peer_dead_ms, every
#                  link down), claims it at the coordinator and serves it. Then
#                  `hostd up --detach --timeout 180` adopts the outcome (a restarted as a
#                  standby, served by b) and `hostd giveback a` brings a home.
# Before each kill the script writes a fresh pattern to a 64 KiB block of export a through
# a's service IP; a good read is a qemu-io `read -P` of that block (a wrong pattern stops
# the run: an acknowledged write was lost). The client: a probe in the namespace makes one
# good read first (its time is the "idle read" column: what one fresh qemu-io read costs
# when nothing fails), waits for the kill, then starts a TCP connect to a's service IP
# every 10 ms (each bounded to 100 ms) and, whenever one connects, runs the qemu-io read,
# until a read succeeds. Without that gate a qemu-io whose SYN went to the dead node's MAC
# would wait for TCP's 1 s SYN retransmission, and both figures would measure that.
# Target: median without hostd <= peer_dead_ms + 2 x median hostd-driven (met/missed).
# It also lists any QEMU processes not its own seen around the kills (they share the CPUs).
# Needs root (bridge mode makes a namespace, a bridge and taps), qemu-io and python3. Always
# stops the pair (`hostd down --purge`, starting hostd again first if a trial killed it),
# removes its state and the namespace, also on an error or an interrupt.
#
# Environment: TRIALS (default 5), HOSTD (a hostd binary; default: build hostd, the storage
# daemon and the agent of this tree (debug) and the guest image, and use target/debug/hostd),
# ABSENT_WAIT_MS (from hostd's SIGKILL to a's, default hostd_absent_ms + 1000),
# SETTLE_S (the pause before each kill, so that b's failover monitor is back to its idle
# polling after the previous move, default 3), KEEP_LOGS=DIR (copy hostd.log,
# events.jsonl and the consoles there at the end).
# Usage: [TRIALS=N] scripts/bench-without-hostd.sh [HOSTD_ABSENT_MS [PEER_DEAD_MS]]
#        (the pair's [failover] hostd_absent_ms and peer_dead_ms; default 1500 and 1000,
#        the product's defaults)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

hostd_absent_ms=${1:-1500}
peer_dead_ms=${2:-1000}
trials=${TRIALS:-5}
absent_wait_ms=${ABSENT_WAIT_MS:-$((hostd_absent_ms + 1000))}
settle_s=${SETTLE_S:-3}
die() {
    echo "bench-without-hostd: error: $*" >&2
    exit 1
}
# in_range VALUE LOW HIGH: VALUE is a whole number from LOW to HIGH.
in_range() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= $2 && $1 <= $3)); }
in_range "$hostd_absent_ms" 500 600000 ||
    die "HOSTD_ABSENT_MS=$hostd_absent_ms: 500 to 600000 (usage: $0 [HOSTD_ABSENT_MS [PEER_DEAD_MS]])"
in_range "$peer_dead_ms" 200 600000 || die "PEER_DEAD_MS=$peer_dead_ms: 200 (twice the heartbeat interval) to 600000"
[[ $trials =~ ^[1-9][0-9]*$ ]] || die "TRIALS=$trials: a positive number"
in_range "$absent_wait_ms" $((hostd_absent_ms + 1)) 3600000 ||
    die "ABSENT_WAIT_MS=$absent_wait_ms: more than hostd_absent_ms ($hostd_absent_ms), else hostd is not absent yet at the kill"
[[ $settle_s =~ ^[0-9]+$ ]] || die "SETTLE_S=$settle_s: a number of seconds"
((EUID == 0)) || die "needs root: bridge mode makes a network namespace, a bridge and taps"
for tool in ip qemu-io python3 timeout; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done

if [[ -n ${HOSTD:-} ]]; then
    hostd=$HOSTD
else
    cargo build --quiet -p hostd -p blkd -p guest-agent --bins
    # Incremental: a second when nothing changed; an image from another build of the agent
    # would not read this hostd's settings.
    scripts/build-guest-image.sh >/dev/null
    hostd=$target_dir/debug/hostd
fi
[[ -x $hostd ]] || die "HOSTD=$hostd is not an executable"

tag=$$
netns=ivha-bwh-$tag bridge=ivbw$((tag % 100000))
ip_a=10.79.0.11 ip_b=10.79.0.12
[[ ! -e /run/netns/$netns ]] || die "network namespace $netns exists already"
state=$(mktemp -d /dev/shm/ivha-bench-woh.XXXXXX)
work=$(mktemp -d /tmp/ivha-bench-woh.XXXXXX)
probe_pid=""

h() { IVHA_STATE_DIR=$state "$hostd" "$@"; }

cleanup() {
    local status=$?
    [[ -z $probe_pid ]] || kill "$probe_pid" 2>/dev/null || true
    if ((status != 0)) && [[ -s $state/hostd.log ]]; then
        echo "--- last lines of $state/hostd.log:" >&2
        tail -n 20 "$state/hostd.log" >&2
    fi
    if ! h down --purge >/dev/null 2>&1; then
        # A trial killed hostd: nodes run without one, and `down` stops only what a hostd
        # has adopted.
        h up --detach --timeout 120 >/dev/null 2>&1 || true
        h down --purge >/dev/null 2>&1 || echo "bench-without-hostd: warning: hostd down --purge failed; see $state" >&2
    fi
    if [[ -n ${KEEP_LOGS:-} ]]; then
        mkdir -p "$KEEP_LOGS"
        cp -r "$state/hostd.log" "$state/events.jsonl" "$state/consoles" "$KEEP_LOGS/" 2>/dev/null || true
        echo "logs kept in $KEEP_LOGS" >&2
    fi
    [[ ! -e /run/netns/$netns ]] || ip netns del "$netns" 2>/dev/null || true
    rm -rf "$state" "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# q WHAT [NODE]: reads `hostd status --json` (fails while no hostd answers).
#   pid NODE     NODE's QEMU pid
#   hostd        hostd's pid
#   accel        the accelerator
#   home         succeeds when both nodes are up, each serving its own identity
#   adopted      succeeds when a is up (a standby) and served by b
#   served NODE  who serves NODE's identity
#   coordinator  succeeds when hostd reads a coordinator generation (agents may act alone)
q() {
    local json
    json=$(h status --json 2>/dev/null) || return 1
    python3 -c '
import json, sys
s = json.loads(sys.stdin.read())
nodes = {n["name"]: n for n in s["nodes"]}
what = sys.argv[1]
if what == "pid":
    print(nodes[sys.argv[2]].get("pid") or 0)
elif what == "hostd":
    print(s["hostd_pid"])
elif what == "accel":
    print(s.get("accel", "unknown"))
elif what == "home":
    sys.exit(0 if all(n["state"] == "up" and n.get("served_by") == name for name, n in nodes.items()) else 1)
elif what == "adopted":
    a = nodes["a"]
    sys.exit(0 if a["state"] == "up" and a.get("served_by") == "b" else 1)
elif what == "served":
    print(nodes[sys.argv[2]].get("served_by") or "nobody")
elif what == "coordinator":
    sys.exit(0 if s.get("coordinator_generation") is not None else 1)
' "$@" <<<"$json"
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 250 ms until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out after $1 s waiting for $what"
        sleep 0.25
    done
}

# qemu_io IP COMMAND: one qemu-io command on export a at IP from the namespace, retried
# while it does not connect (up to 60 s); fails if the command fails.
qemu_io() {
    local uri=nbd://$1:10809/a out deadline=$((SECONDS + 60))
    while :; do
        if out=$(timeout -k 1 10 ip netns exec "$netns" qemu-io -f raw "$uri" -c "$2" 2>&1) &&
            [[ $out != *failed* && $out != *error* ]]; then
            return 0
        fi
        if [[ $out != *"Could not open"* && $out != *"Failed to"* && -n $out ]] || ((SECONDS >= deadline)); then
            die "qemu-io $uri -c '$2': $out"
        fi
        sleep 0.1
    done
}

# The client's probe, run in the namespace: ARGS IP PATTERN OFFSET TRIGGER. One good read
# (prints `ready MS`, its duration), then it waits for TRIGGER to hold the kill's time
# ($EPOCHREALTIME), and reads as the header says; prints `ok MS ATTEMPTS` (MS from the
# kill to the end of the first good read, ATTEMPTS the qemu-io runs it took). A read of
# the wrong pattern exits 2.
cat >"$work/probe.py" <<'EOF'
import os, socket, subprocess, sys, threading, time

ip, pattern, offset, trigger = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
uri = f"nbd://{ip}:10809/a"
command = ["qemu-io", "-f", "raw", uri, "-c", f"read -P {pattern} {offset} 64k"]

def read():
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    text = r.stdout + r.stderr
    if "Pattern verification failed" in text:
        print(f"bad the read through {uri} returned another pattern than {pattern}: {text.strip()}", flush=True)
        sys.exit(2)
    return r.returncode == 0 and "failed" not in text and "error" not in text

start = time.monotonic()
while True:
    t = time.monotonic()
    if read():
        print(f"ready {(time.monotonic() - t) * 1000:.1f}", flush=True)
        break
    if time.monotonic() - start > 60:
        print("none: no good read within 60 s before the kill", flush=True)
        sys.exit(1)
    time.sleep(0.1)

while not os.path.exists(trigger):
    time.sleep(0.001)
t0 = float(open(trigger).read())

connected = threading.Event()
def connect():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(0.1)
    try:
        s.connect((ip, 10809))
        connected.set()
    except OSError:
        pass
    finally:
        s.close()

attempts = 0
while time.time() - t0 < 120:
    connected.clear()
    while not connected.is_set() and time.time() - t0 < 120:
        threading.Thread(target=connect, daemon=True).start()
        connected.wait(0.01)
    attempts += 1
    if read():
        print(f"ok {(time.time() - t0) * 1000:.1f} {attempts}", flush=True)
        sys.exit(0)
    time.sleep(0.01)
print("none: no good read within 120 s of the kill", flush=True)
sys.exit(1)
EOF

# probe_start PATTERN OFFSET: starts the probe; returns once it made its first good read
# (its duration in $idle_ms).
probe_start() {
    rm -f "$work/trigger" "$work/probe.out"
    ip netns exec "$netns" python3 "$work/probe.py" "$ip_a" "$1" "$2" "$work/trigger" >"$work/probe.out" 2>&1 &
    probe_pid=$!
    local deadline=$((SECONDS + 70))
    until grep -q '^ready ' "$work/probe.out"; do
        kill -0 "$probe_pid" 2>/dev/null || die "the probe ended before the kill: $(cat "$work/probe.out")"
        ((SECONDS < deadline)) || die "the probe made no good read through $ip_a"
        sleep 0.05
    done
    idle_ms=$(sed -n 's/^ready //p' "$work/probe.out")
}

# probe_fire T0: hands the probe the kill's time and waits for its first good read; sets
# $read_ms and $attempts.
probe_fire() {
    echo "$1" >"$work/trigger.tmp"
    mv "$work/trigger.tmp" "$work/trigger"
    local code=0
    wait "$probe_pid" || code=$?
    probe_pid=""
    ((code == 0)) || die "the probe failed (exit $code): $(cat "$work/probe.out")"
    read -r _ read_ms attempts < <(grep '^ok ' "$work/probe.out")
}

# kill_and_wait PID WHAT: SIGKILLs PID and waits (up to 10 s) until it is gone.
kill_and_wait() {
    local deadline=$((SECONDS + 10))
    kill -KILL "$1" || die "cannot SIGKILL $2 ($1)"
    while [[ -e /proc/$1 ]]; do
        ((SECONDS < deadline)) || die "$2 ($1) survived SIGKILL"
        sleep 0.01
    done
}

# The pids of the QEMU processes running on the machine (zombies left out).
qemus() { ps -eo pid=,stat=,comm= | awk '$3 ~ /^qemu-system/ && $2 !~ /^Z/ {print $1}'; }

# seen_others WHEN: notes QEMU processes that are not this pair's (another pair on the
# machine takes CPU from the one measured).
contention=()
seen_others() {
    local a b n
    a=$(q pid a) && b=$(q pid b) || return 0
    n=$(qemus | grep -cvxF -e "$a" -e "$b" || true)
    ((n == 0)) || contention+=("$1: $n")
}

# give_back: `hostd giveback a`, then both nodes up and home.
give_back() {
    h giveback a >/dev/null || die "hostd giveback a failed"
    wait_for 120 "a and b up, each serving its own identity, after the giveback" q home
}

others=$(qemus | wc -l)
((others == 0)) || echo "bench-without-hostd: note: $others other QEMU processes run on this machine" >&2
port=$(free_ports 2 25809) || die "no 2 free ports found"
cat >"$state/ivha.toml" <<EOF
[network]
mode = "bridge"
bridge = "$bridge"
netns = "$netns"
bridge_address = "10.79.0.1/24"
[metrics]
enabled = false
[disks]
size_mib = 256
[failover]
hostd_absent_ms = $hostd_absent_ms
peer_dead_ms = $peer_dead_ms
[[node]]
name = "a"
nbd_port = $port
address = "10.79.0.2/24"
service_ip = "$ip_a/24"
[[node]]
name = "b"
nbd_port = $((port + 1))
address = "10.79.0.3/24"
service_ip = "$ip_b/24"
EOF
h up --detach --timeout 180 --config "$state/ivha.toml" >/dev/null || die "the pair did not start"
wait_for 180 "a and b up, each serving its own identity" q home
wait_for 30 "hostd to read the coordinator (else the agents never act without hostd)" q coordinator
accel=$(q accel)

echo "ivha failover without hostd against failover by hostd, bridge mode, $trials trials"
echo "  machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), accel $accel"
echo "  [failover] hostd_absent_ms = $hostd_absent_ms, peer_dead_ms = $peer_dead_ms (the agents' detection time);"
echo "  hostd SIGKILLed $absent_wait_ms ms before a's QEMU in the without-hostd trials"
echo "  kill (SIGKILL of a's QEMU) -> first good read (qemu-io read -P of a block written just before)"
echo "  through a's service IP $ip_a from namespace $netns; idle read = one such read with nothing failing"
echo

block=0
: >"$work/rows"
for ((trial = 1; trial <= trials; trial++)); do
    # Hostd-driven.
    sleep "$settle_s"
    block=$((block + 1)) pattern=$((block % 250 + 1))
    qemu_io "$ip_a" "write -P $pattern $((block * 65536)) 64k"
    qemu_pid=$(q pid a)
    ((qemu_pid > 0)) || die "a has no QEMU pid"
    probe_start "$pattern" $((block * 65536))
    seen_others "trial $trial, before the hostd-driven kill"
    t0=$EPOCHREALTIME
    kill -KILL "$qemu_pid" || die "cannot SIGKILL a's QEMU ($qemu_pid)"
    probe_fire "$t0"
    seen_others "trial $trial, after the hostd-driven first read"
    driven_ms=$read_ms driven_attempts=$attempts driven_idle=$idle_ms
    [[ $(q served a) == b ]] || die "trial $trial: after the hostd-driven takeover hostd says a is served by $(q served a)"
    give_back

    # Without hostd.
    sleep "$settle_s"
    block=$((block + 1)) pattern=$((block % 250 + 1))
    qemu_io "$ip_a" "write -P $pattern $((block * 65536)) 64k"
    qemu_pid=$(q pid a) hostd_pid=$(q hostd)
    ((qemu_pid > 0)) || die "a has no QEMU pid"
    q coordinator || die "trial $trial: hostd reads no coordinator: the agents would not act without it"
    probe_start "$pattern" $((block * 65536))
    seen_others "trial $trial, before the kills without hostd"
    kill_and_wait "$hostd_pid" hostd
    sleep "$((absent_wait_ms / 1000)).$(printf %03d $((absent_wait_ms % 1000)))"
    t0=$EPOCHREALTIME
    kill -KILL "$qemu_pid" || die "cannot SIGKILL a's QEMU ($qemu_pid)"
    probe_fire "$t0"
    alone_ms=$read_ms alone_attempts=$attempts alone_idle=$idle_ms
    out=$(h up --detach --timeout 180 2>&1) || die "hostd up after the kill failed: $out"
    [[ $out == *adopted* ]] || echo "  note: trial $trial: hostd up did not say it adopted anything: $out" >&2
    wait_for 180 "hostd to adopt b's claim: a up (a standby) and served by b" q adopted
    seen_others "trial $trial, after hostd adopted the claim"
    give_back

    echo "$trial $driven_ms $driven_attempts $driven_idle $alone_ms $alone_attempts $alone_idle" >>"$work/rows"
    echo "  trial $trial: hostd-driven $driven_ms ms ($driven_attempts qemu-io runs), without hostd $alone_ms ms ($alone_attempts)" >&2
done

python3 - "$work/rows" "$peer_dead_ms" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
dead = int(sys.argv[2])
print(f"{'trial':<8} {'hostd-driven':>13} {'without hostd':>14} {'idle read':>10}   (ms; qemu-io runs to the first good read)")
for t, d, da, di, a, aa, ai in rows:
    print(f"{t:<8} {float(d):>8.1f} ({da:>2}) {float(a):>9.1f} ({aa:>2}) {float(di):>5.1f} / {float(ai):.1f}")
driven = statistics.median(float(r[1]) for r in rows)
alone = statistics.median(float(r[4]) for r in rows)
idle = statistics.median([float(r[3]) for r in rows] + [float(r[6]) for r in rows])
print(f"{'median':<8} {driven:>8.1f}      {alone:>9.1f}      {idle:>5.1f}")
print()
bound = dead + 2 * driven
verdict = "met" if alone <= bound else "MISSED"
within = sum(float(r[4]) <= bound for r in rows)
print(f"detection time the agents used (peer_dead_ms): {dead} ms")
print(f"without hostd / hostd-driven (medians): {alone / driven:.1f}x; without hostd - peer_dead_ms: {alone - dead:.1f} ms")
print(f"target: without hostd <= peer_dead_ms + 2 x hostd-driven = {dead} + 2 x {driven:.1f} = {bound:.1f} ms: {alone:.1f} ms, {verdict}"
      f" ({within} of {len(rows)} trials within it)")
EOF
if ((${#contention[@]} > 0)); then
    echo "other QEMU processes seen (not this pair's; they share the CPUs):"
    for line in "${contention[@]}"; do echo "  $line"; done
else
    echo "other QEMU processes: none seen around any kill"
fi
