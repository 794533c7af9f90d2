#!/usr/bin/env bash
# Benchmarks the interconnect between real QEMU guests (docs/interconnect.md) with the
# agents' test clients ([interconnect] stream_ms, ping_ms, bulk). Each part runs pairs of
# its own, one after the other (never two at once), and prints its figures, ratios against
# a baseline measured in the same run, and the issue's target:
#   failover  a control stream of one message every STREAM_MS ms (default links: 2 network
#             links and the mailbox). TRIALS times: the network link carrying it is cut on
#             a's side (`hostd link a L down`) and each side's longest gap between two
#             messages over the last 5 s (stream_recent_gap_us) is read: just before the cut
#             (the baseline jitter), 1.5 s after it (with the messages delivered by then),
#             once the stream moves again after the restore (a stream still stalled at
#             1.5 s is not missed), and 1 s after every link is up again (the channels'
#             return); the trial's gap is the largest of the last three. Then 5 s more, so
#             that the window forgets the trial. One more trial cuts every network link at
#             once (the mailbox is left). Target: every gap under 3 heartbeat intervals; no
#             message lost, repeated or out of order (stream_errors 0, else FAIL and exit 1).
#   bulk      bulk channels kept full: links = 1, bulk = 1 (A) against links = 2, bulk = 2
#             (B), no mailbox; bulk bytes received by both sides over DURATION_S after 3 s
#             of warm-up, in MiB/s, and B / A (target at least 1.7). The QEMUs' CPU during
#             the window is shown: under TCG the guests' CPUs, not the links, may be the
#             limit.
#   latency   pings on a control channel every 10 ms (links = 2 and the mailbox): round
#             trip p50 / p99 (the agent's last 1000) idle, then on a pair with bulk = 1 as
#             well; p99 loaded / idle (target at most 2).
#   idle      what an idle pair's QEMUs cost (utime + stime of all threads, as
#             measure-idle.sh), without the interconnect (links = 0, mailbox = false)
#             against the default one, in % of a core per guest, and the difference.
# Before each pair starts, it waits (up to QUIET_WAIT_S) until no other QEMU runs and the
# rest of the machine uses under half a core, and each measurement reports what else used
# the CPUs (the summary lists any contention). The state directory (under /dev/shm) goes at
# exit, every pair stopped; a pair that fails leaves its hostd.log, events.jsonl, consoles
# and last status in /tmp/bench-ic-logs/PAIR.
#
# Environment: ONLY=failover|bulk|latency|idle (one part; default: all four), TRIALS (cuts
# of the failover part, default 5), DURATION_S (each measurement window, default 10),
# STREAM_MS (default 1), HEARTBEAT_MS (the failover pair's, default 50), QUIET_WAIT_S (the
# longest wait for a quiet machine before each pair, default 600), KEEP_LOGS=DIR (copy
# every pair's logs to DIR/PAIR).
# Usage: [ONLY=part] [TRIALS=N] [DURATION_S=S] scripts/bench-interconnect.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

only=${ONLY:-}
trials=${TRIALS:-5}
duration=${DURATION_S:-10}
stream_ms=${STREAM_MS:-1}
heartbeat_ms=${HEARTBEAT_MS:-50}
quiet_wait=${QUIET_WAIT_S:-600}
failure_logs=/tmp/bench-ic-logs
die() {
    echo "bench-interconnect: error: $*" >&2
    exit 1
}
[[ -z $only || $only =~ ^(failover|bulk|latency|idle)$ ]] || die "ONLY=$only: failover, bulk, latency or idle"
[[ $trials =~ ^[1-9][0-9]*$ ]] || die "TRIALS=$trials: a positive number"
[[ $duration =~ ^[1-9][0-9]*$ ]] || die "DURATION_S=$duration: a positive number of seconds"
[[ $stream_ms =~ ^[1-9][0-9]*$ ]] || die "STREAM_MS=$stream_ms: a positive number of ms"
[[ $heartbeat_ms =~ ^[1-9][0-9]*$ ]] || die "HEARTBEAT_MS=$heartbeat_ms: a positive number of ms"
[[ $quiet_wait =~ ^[0-9]+$ ]] || die "QUIET_WAIT_S=$quiet_wait: a number of seconds"
command -v python3 >/dev/null || die "python3 is missing"
wanted() { [[ -z $only || $only == "$1" ]]; }

nice cargo build --quiet -p hostd -p blkd -p guest-agent --bins
nice scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd
ticks=$(getconf CLK_TCK)

work=$(mktemp -d /dev/shm/ivha-bench-ic.XXXXXX)
state="" pair_label="" pairs=0 failed=0
summary=() contention=()
declare -A qemu_pid=() qemu_pct=()

h() { IVHA_STATE_DIR=$state "$hostd" "$@"; }

# Copies the current pair's logs and last status to $failure_logs/PAIR.
keep_failure_logs() {
    local dir=$failure_logs/$pair_label
    mkdir -p "$dir"
    cp -r "$state/hostd.log" "$state/events.jsonl" "$state/consoles" "$state/ivha.toml" "$dir/" 2>/dev/null || true
    h status --json >"$dir/status.json" 2>&1 || true
    echo "bench-interconnect: the logs of pair $pair_label are kept in $dir" >&2
}

# stop_pair STATUS: stops the current pair (its logs to KEEP_LOGS/PAIR if asked) and
# removes its state directory.
stop_pair() {
    [[ -n $state ]] || return 0
    KEEP_LOGS=${KEEP_LOGS:+$KEEP_LOGS/$pair_label} close_pair "$1" "$hostd" "$state"
    state="" qemu_pid=()
}

cleanup() {
    local status=$?
    if [[ -n $state ]]; then
        ((status == 0)) || keep_failure_logs
        stop_pair "$status"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# q WHAT [ARG]: reads `hostd status --json` of the current pair. a<-b is what a's clients
# got from b.
#   up N         succeeds when both nodes are up, each with N links to its peer, all up
#   accel        the accelerator and why
#   pids         "NAME PID" per node
#   links        a readable excerpt: each node's links and clients
#   stream       received, errors, recent gap (µs) of a<-b, then of b<-a
#   control      the network link of a to b that carries channels while bulk runs on none
#   bulk         bulk bytes in of a<-b and b<-a, then LINK:BYTES-IN:CHANNELS of a's links
#   ping         pings, p50, p99 (µs) of a<-b, then of b<-a
q() {
    local json
    json=$(h status --json 2>/dev/null) || return 1
    python3 -c '
import json, sys
s = json.loads(sys.stdin.read())
nodes = {n["name"]: n for n in s["nodes"]}
what = sys.argv[1]
def client(node, peer, field):
    c = next((c for c in nodes[node].get("link_clients", []) if c["peer"] == peer), {})
    return c.get(field, 0)
if what == "up":
    want = int(sys.argv[2])
    ok = len(nodes) == 2 and all(
        n["state"] == "up" and len(n.get("links", [])) == want
        and all(l["state"] == "up" for l in n.get("links", []))
        for n in nodes.values())
    sys.exit(0 if ok else 1)
elif what == "accel":
    reason = s.get("accel_reason", "")
    print(s["accel"] + (f" ({reason})" if reason else ""))
elif what == "pids":
    for n in s["nodes"]:
        print(n["name"], n.get("pid") or 0)
elif what == "links":
    for n in s["nodes"]:
        print(f"{n['\''name'\'']} ({n['\''state'\'']}) links:", json.dumps(n.get("links", [])))
        print(f"{n['\''name'\'']} link_clients:", json.dumps(n.get("link_clients", [])))
elif what == "stream":
    print(*[client(x, y, f) for x, y in (("a", "b"), ("b", "a"))
            for f in ("stream_received", "stream_errors", "stream_recent_gap_us")])
elif what == "control":
    used = [l["link"] for l in nodes["a"]["links"]
            if l["peer"] == "b" and l["kind"] == "network" and l["channels"] > 0]
    print(used[0] if len(used) == 1 else "")
elif what == "bulk":
    print(client("a", "b", "bulk_bytes_in"), client("b", "a", "bulk_bytes_in"),
          *[f"{l['\''link'\'']}:{l['\''bytes_in'\'']}:{l['\''channels'\'']}" for l in nodes["a"]["links"] if l["peer"] == "b"])
elif what == "ping":
    print(*[client(x, y, f) for x, y in (("a", "b"), ("b", "a"))
            for f in ("pings", "ping_p50_us", "ping_p99_us")])
' "$@" <<<"$json"
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 250 ms until it succeeds; on a
# timeout shows the links and clients, and fails.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if ((SECONDS >= deadline)); then
            echo "bench-interconnect: timed out waiting for $what; hostd status:" >&2
            q links >&2 || echo "(hostd status failed)" >&2
            die "timed out waiting for $what"
        fi
        sleep 0.25
    done
}

# other_busy: what the machine used over 6 s, in % of a core (no pair of ours runs then);
# over less if a QEMU shows up meanwhile (test suites start and stop QEMUs one after the
# other: one look may fall between two of them).
other_busy() {
    local h0 h1 i
    h0=$(host_ticks)
    for ((i = 1; i <= 3; i++)); do
        sleep 2
        ! pgrep qemu-system >/dev/null || break
    done
    h1=$(host_ticks)
    echo $((100 * (h1 - h0) / ticks / (2 * (i > 3 ? 3 : i))))
}

# wait_quiet WHAT: waits (up to QUIET_WAIT_S, default 10 min, looking every 20 s or so)
# until no QEMU runs on the machine (none of ours does at this point) and the rest of it
# used less than half a core over 6 s (a test suite of someone else's, a build), so that
# the figures do not share the CPUs; past that it goes on and says so.
wait_quiet() {
    local what=$1 start=$SECONDS waited n busy pids
    if pgrep qemu-system >/dev/null; then
        sleep 3 # a QEMU that is just going
    fi
    while :; do
        busy=$(other_busy)
        n=$(pgrep -c qemu-system || true)
        ((n > 0 || busy >= 50)) || break
        waited=$((SECONDS - start))
        if ((waited >= quiet_wait)); then
            echo "  note: after $waited s of waiting, $n other QEMU processes run and the rest of the machine used $busy % of a core; $what starts anyway"
            contention+=("$what: started beside $n other QEMU processes and $busy % of a core of other work (waited $waited s)")
            return 0
        fi
        pids=""
        ((n == 0)) || pids=" (pids $(pgrep -d, qemu-system || true))"
        echo "  waiting before $what: $n other QEMU processes$pids, the rest of the machine used $busy % of a core"
        sleep 14
    done
    waited=$((SECONDS - start))
    ((waited < 15)) || contention+=("$what: waited $waited s for other QEMU processes or other work to end")
}

# start_pair LABEL LINKS TOML: a pair with TOML in its [interconnect] section (none if
# empty), up once both nodes are up with LINKS links each, all up both ways.
start_pair() {
    local ic=$3 port t0 name pid
    pair_label=$1
    wait_quiet "pair $pair_label"
    pairs=$((pairs + 1))
    state=$work/p$pairs
    mkdir "$state"
    port=$(free_ports 2 24809) || die "no 2 free ports found"
    {
        printf '[metrics]\nenabled = false\n'
        [[ -z $ic ]] || printf '[interconnect]\n%s\n' "$ic"
        cluster_nodes "$port" 2
    } >"$state/ivha.toml"
    t0=$SECONDS
    h up --detach --config "$state/ivha.toml" >/dev/null
    wait_for 180 "both nodes up with $2 links each, all up both ways" q up "$2"
    while read -r name pid; do
        [[ $pid != 0 && -d /proc/$pid ]] || die "node $name has no running QEMU (pid $pid)"
        qemu_pid[$name]=$pid
    done < <(q pids)
    if [[ -z ${accel:-} ]]; then
        accel=$(q accel)
        echo "  accel: $accel"
    fi
    echo "  pair $pair_label up, links up both ways, after $((SECONDS - t0)) s; [interconnect] ${ic:-(defaults)}" | tr '\n' ' '
    echo
}

# Ticks of CPU (utime + stime) of every thread of process $1.
qemu_ticks() {
    local task stat rest f total=0
    for task in /proc/"$1"/task/*; do
        stat=$(cat "$task/stat" 2>/dev/null) || continue
        rest=${stat##*) } # fields from 3 (state) on: utime and stime are 14 and 15
        read -r -a f <<<"$rest"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Ticks the whole machine was busy (every CPU).
host_ticks() {
    local user nice system irq softirq steal
    read -r _ user nice system _ _ irq softirq steal _ </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# cpu_begin: starts measuring the CPU of this pair's QEMUs and of the rest of the machine.
declare -A cpu_before=()
cpu_host0=0 cpu_t0=0
cpu_begin() {
    local name
    cpu_host0=$(host_ticks)
    cpu_t0=$EPOCHREALTIME
    for name in "${!qemu_pid[@]}"; do cpu_before[$name]=$(qemu_ticks "${qemu_pid[$name]}"); done
}

# cpu_end LABEL: sets qemu_pct (% of a core per node since cpu_begin) and prints it with
# what the rest of the machine used meanwhile; notes contention.
cpu_end() {
    local label=$1 name used ours=0 host1 t1 other foreign pct_a pct_b
    for name in "${!qemu_pid[@]}"; do
        [[ -d /proc/${qemu_pid[$name]} ]] || die "node $name's QEMU (pid ${qemu_pid[$name]}) exited during the measurement"
        used=$(($(qemu_ticks "${qemu_pid[$name]}") - cpu_before[$name]))
        ours=$((ours + used))
        qemu_pct[$name]=$used
    done
    t1=$EPOCHREALTIME
    host1=$(host_ticks)
    read -r pct_a pct_b other < <(python3 -c "
t = $t1 - $cpu_t0
pct = lambda ticks: 100 * ticks / $ticks / t
print(f'{pct(${qemu_pct[a]}):.1f} {pct(${qemu_pct[b]}):.1f} {max(0, pct($host1 - $cpu_host0 - $ours)):.0f}')")
    qemu_pct[a]=$pct_a qemu_pct[b]=$pct_b
    # QEMUs that are not this pair's.
    foreign=$(pgrep qemu-system | grep -cvxF -e "${qemu_pid[a]}" -e "${qemu_pid[b]}" || true)
    echo "  (CPU during $label: QEMU a ${qemu_pct[a]} %, b ${qemu_pct[b]} % of a core; everything else on the machine $other % of a core; load $(cut -d' ' -f1-3 /proc/loadavg))"
    if ((foreign > 0)); then
        echo "  note: $foreign other QEMU processes ran meanwhile"
        contention+=("$label: $foreign other QEMU processes ran meanwhile")
    fi
    if ((other > 25)); then
        contention+=("$label: other processes used $other % of a core meanwhile")
    fi
}

# window LABEL SECONDS: sleeps SECONDS, measuring the CPU (cpu_begin, cpu_end).
window() {
    cpu_begin
    sleep "$2"
    cpu_end "$1"
}

echo "machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1))"

# --- 1. Link failover gap.
failover() {
    local ctl i
    echo
    echo "== link failover gap: a control stream of one message every $stream_ms ms, heartbeat $heartbeat_ms ms"
    start_pair failover 3 "stream_ms = $stream_ms"$'\n'"heartbeat_ms = $heartbeat_ms"
    stream_flows
    sleep 6 # the 5-s window forgets the start
    # The network link that carries the channels (link 1 by the placement rule); links that
    # flap under load may move them for a while.
    local deadline=$((SECONDS + 30))
    until ctl=$(q control) && [[ -n $ctl ]]; do
        if ((SECONDS >= deadline)); then
            ctl=1
            echo "  note: no single network link carried the stream for 30 s (links flapping?); cutting link 1"
            contention+=("failover: the stream's link could not be told for 30 s (links flapping)")
            break
        fi
        sleep 0.5
    done
    echo "  the stream rides network link $ctl (a's channels there). Each trial cuts a's link $ctl and reads"
    echo "  each side's longest gap between two messages over the last 5 s: just before the cut"
    echo "  (baseline), 1.5 s after it, once the stream moves again after the restore (so a stall is"
    echo "  not missed), and 1 s after every link is up again (the channels' return); the trial's gap"
    echo "  is the largest of the last three (each window still holds the cut). hb = heartbeat"
    printf '  %-5s %-5s %9s %19s %19s %19s %16s\n' trial side "before" "1.5 s after cut" "after restore" "after return" "msgs in 1.5 s"
    : >"$work/failover"
    cpu_begin
    for ((i = 1; i <= trials; i++)); do
        cut_trial "$i" "$ctl"
    done
    cut_trial "all" "0 1"
    cpu_end "the failover trials"
    local line
    line=$(python3 - "$work/failover" "$heartbeat_ms" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
hb = int(sys.argv[2])
trial = [r for r in rows if r[0] != "all"]
allnet = [r for r in rows if r[0] == "all"]
ms = lambda r, i: int(r[i]) / 1000
before = [ms(r, 2) for r in trial]
first = [ms(r, 3) for r in trial]
gap = [max(ms(r, 3), ms(r, 4), ms(r, 5)) for r in trial]
def stats(xs):
    p50, top = statistics.median(xs), max(xs)
    return f"p50 {p50:7.1f} ms ({p50 / hb:4.2f} hb), max {top:7.1f} ms ({top / hb:4.2f} hb)"
print(f"  baseline (before the cut):      {stats(before)}")
print(f"  gap 1.5 s after the cut:        {stats(first)}")
print(f"  gap of the trial (cut, restore,")
print(f"    return):                      {stats(gap)}")
ratio = statistics.median(gap) / max(statistics.median(before), 0.001)
print(f"  ratio p50 gap / p50 baseline: {ratio:.1f}")
target = 3 * hb
verdict = "met" if max(gap) < target else "MISSED"
print(f"  target: every gap under 3 x heartbeat = {target} ms: {verdict} (max {max(gap):.1f} ms = {max(gap) / hb:.2f} hb)")
marked = [r for r in rows if int(r[2]) >= max(int(r[3]), int(r[4]), int(r[5]))]
if marked:
    print(f"  * {len(marked)} of {len(rows)} readings: the gap before the cut was at least as long (the 5-s windows")
    print(f"    overlap it): that gap may not be the cut's; the machine stalled the stream before it")
short = [r for r in trial if int(r[6]) < 0.9 * int(r[7])]
if short:
    print(f"  the stream fell behind in {len(short)} of {len(trial)} cut windows (under 90 % of its messages in the first 1.5 s)")
for r in allnet:
    g = max(ms(r, 3), ms(r, 4), ms(r, 5))
    print(f"  every network link cut (the mailbox left), {r[1]}: gap {g:.1f} ms ({g / hb:.2f} hb), {r[6]} of ~{r[7]} messages in the first 1.5 s")
print(f"SUMMARY failover: gap p50 {statistics.median(gap):.1f} ms, max {max(gap):.1f} ms = {max(gap) / hb:.2f} x heartbeat (target < 3: {verdict}); baseline p50 {statistics.median(before):.1f} ms; ratio p50 {ratio:.1f}; every network link cut: " +
      ", ".join(f"{r[1]} {max(ms(r, 3), ms(r, 4), ms(r, 5)):.1f} ms" for r in allnet))
EOF
    )
    grep -v '^SUMMARY' <<<"$line"
    local errors
    errors=$(q stream) || die "hostd status failed"
    read -r rx_ab err_ab _ rx_ba err_ba _ <<<"$errors"
    local verdict=ok
    if ((err_ab != 0 || err_ba != 0)); then
        verdict=FAIL
        failed=1
        keep_failure_logs
    fi
    echo "  stream errors (lost, repeated or out of order): a<-b $err_ab of $rx_ab, b<-a $err_ba of $rx_ba: $verdict"
    summary+=("$(sed -n 's/^SUMMARY //p' <<<"$line"); stream errors $((err_ab + err_ba)): $verdict")
    stop_pair 0
}

# stream_past A B: succeeds once a<-b got A messages and b<-a B.
stream_past() {
    local now a b
    now=$(q stream) || return 1
    read -r a _ _ b _ _ <<<"$now"
    ((a >= $1 && b >= $2))
}

# Waits until the stream has moved 200 messages each way.
stream_flows() {
    local rx_ab rx_ba vals
    vals=$(q stream) || die "hostd status failed"
    read -r rx_ab _ _ rx_ba _ _ <<<"$vals"
    wait_for 60 "the stream flowing both ways" stream_past $((rx_ab + 200)) $((rx_ba + 200))
}

# cut_trial LABEL LINKS: cuts a's LINKS and reads the stream 1.5 s later; restores them,
# reads once the stream moved 50 messages more each way, and 1 s after every link is up
# again; adds the trial to $work/failover, prints it, and lets 5 s more pass (the 5-s
# window forgets the trial before the next one's baseline).
cut_trial() {
    local label=$1 links=$2 link before after restored returned t0 t1 rx_ab rx_ba
    before=$(q stream) || die "hostd status failed"
    t0=$EPOCHREALTIME
    for link in $links; do h link a "$link" down >/dev/null; done
    sleep 1.5
    after=$(q stream) || die "hostd status failed"
    t1=$EPOCHREALTIME
    for link in $links; do h link a "$link" up >/dev/null; done
    read -r rx_ab _ _ rx_ba _ _ <<<"$after"
    wait_for 60 "the stream moving after trial $label's restore" stream_past $((rx_ab + 50)) $((rx_ba + 50))
    restored=$(q stream) || die "hostd status failed"
    wait_for 60 "every link up again after trial $label" q up 3
    sleep 1
    returned=$(q stream) || die "hostd status failed"
    python3 - "$label" "$stream_ms" "$t0" "$t1" "$before" "$after" "$restored" "$returned" >>"$work/failover" <<'EOF'
import sys
label, every = sys.argv[1], int(sys.argv[2])
t0, t1 = float(sys.argv[3]), float(sys.argv[4])
before, after, restored, returned = ([int(x) for x in a.split()] for a in sys.argv[5:9])
for i, name in ((0, "a<-b"), (3, "b<-a")):
    expected = round((t1 - t0) * 1000 / every)
    print(label, name, before[i + 2], after[i + 2], restored[i + 2], returned[i + 2], after[i] - before[i], expected)
EOF
    tail -n 2 "$work/failover" | python3 -c '
import sys
hb = int(sys.argv[1])
for line in sys.stdin:
    label, name, before, after, restored, returned, delivered, expected = line.split()
    ms = lambda us: f"{int(us) / 1000:6.1f} ms ({int(us) / 1000 / hb:4.2f} hb)"
    # The windows overlap the time before the cut: a gap no longer than the baseline may
    # be the baseline one.
    mark = " *" if int(before) >= max(int(after), int(restored), int(returned)) else ""
    print(f"  {label:<5} {name:<5} {int(before) / 1000:6.1f} ms {ms(after):>19} {ms(restored):>19} {ms(returned):>19} {delivered:>7} of ~{expected}{mark}")
' "$heartbeat_ms"
    sleep 5
}

# --- 2. Bulk over one link and over two.
# Succeeds once bulk bytes arrived both ways.
bulk_flows() {
    local v a b
    v=$(q bulk) || return 1
    read -r a b _ <<<"$v"
    ((a > 0 && b > 0))
}

bulk_mib_s=""
bulk_run() {
    local label=$1 links=$2 bulk=$3 vals0 vals1 t0 t1
    start_pair "bulk-$label" "$links" "links = $links"$'\n'"mailbox = false"$'\n'"bulk = $bulk"
    wait_for 60 "bulk bytes flowing both ways" bulk_flows
    sleep 3
    t0=$EPOCHREALTIME
    vals0=$(q bulk) || die "hostd status failed"
    window "bulk-$label" "$duration"
    t1=$EPOCHREALTIME
    vals1=$(q bulk) || die "hostd status failed"
    python3 - "$label" "$t0" "$t1" "$vals0" "$vals1" "$work/bulk" <<'EOF'
import sys
label = sys.argv[1]
t = float(sys.argv[3]) - float(sys.argv[2])
v0, v1 = sys.argv[4].split(), sys.argv[5].split()
mib = lambda b: b / t / 2**20
ab, ba = int(v1[0]) - int(v0[0]), int(v1[1]) - int(v0[1])
links = []
for x, y in zip(v0[2:], v1[2:]):
    link, b0, _ = x.split(":")
    _, b1, channels = y.split(":")
    links.append(f"link {link} {mib(int(b1) - int(b0)):.2f} ({channels} channels)")
with open(sys.argv[6], "w") as f:
    f.write(f"{mib(ab + ba):.3f}\n")
print(f"  {label}: {mib(ab + ba):.2f} MiB/s (a<-b {mib(ab):.2f}, b<-a {mib(ba):.2f}) over {t:.1f} s; a's bytes in by link, MiB/s: {', '.join(links)}")
EOF
    bulk_mib_s=$(cat "$work/bulk")
    stop_pair 0
}

bulk() {
    local one two
    echo
    echo "== bulk throughput: bulk channels kept full, over one link and over two (no mailbox); ${duration} s after 3 s of warm-up"
    bulk_run "A (links = 1, bulk = 1)" 1 1
    one=$bulk_mib_s
    bulk_run "B (links = 2, bulk = 2)" 2 2
    two=$bulk_mib_s
    local line
    line=$(python3 -c "
a, b = $one, $two
r = b / a if a > 0 else float('inf')
v = 'met' if r >= 1.7 else 'MISSED'
print(f'  ratio B / A: {r:.2f} (target at least 1.7: {v})')
print(f'SUMMARY bulk: one link {a:.2f} MiB/s, two links {b:.2f} MiB/s, ratio {r:.2f} (target >= 1.7: {v})')")
    grep -v '^SUMMARY' <<<"$line"
    summary+=("$(sed -n 's/^SUMMARY //p' <<<"$line")")
    echo "  (under TCG each guest's vCPU runs its agent, virtio-net and the kernel: the QEMU CPU"
    echo "   figures above show whether the guests' CPUs, not the links, set the limit)"
}

# --- 3. Control latency under bulk.
# Succeeds once pings were answered both ways.
pings_flow() {
    local v a b
    v=$(q ping) || return 1
    read -r a _ _ b _ _ <<<"$v"
    ((a > 0 && b > 0))
}

ping_vals=""
latency_run() {
    local label=$1 extra=$2 v0 v1
    start_pair "latency-$label" 3 "links = 2"$'\n'"mailbox = true"$'\n'"ping_ms = 10$extra"
    wait_for 60 "pings answered both ways" pings_flow
    sleep 3
    v0=$(q ping) || die "hostd status failed"
    window "latency-$label" "$duration"
    v1=$(q ping) || die "hostd status failed"
    ping_vals=$v1
    python3 - "$label" "$v0" "$v1" <<'EOF'
import sys
label = sys.argv[1]
v0, v1 = ([int(x) for x in a.split()] for a in sys.argv[2:4])
print(f"  {label}: a<-b p50 {v1[1] / 1000:.2f} ms, p99 {v1[2] / 1000:.2f} ms"
      f" (b<-a p50 {v1[4] / 1000:.2f} ms, p99 {v1[5] / 1000:.2f} ms); {v1[0] - v0[0]} pings in the window,"
      f" percentiles over the last {min(v1[0], 1000)}")
EOF
    stop_pair 0
}

latency() {
    local idle loaded
    echo
    echo "== control latency: pings every 10 ms on a control channel (links = 2, mailbox), idle and beside bulk = 1; ${duration} s after 3 s of warm-up"
    latency_run idle ""
    idle=$ping_vals
    latency_run "loaded (bulk = 1)" $'\n'"bulk = 1"
    loaded=$ping_vals
    local line
    line=$(python3 - "$idle" "$loaded" <<'EOF'
import sys
i, l = ([int(x) for x in a.split()] for a in sys.argv[1:3])
r99 = l[2] / i[2] if i[2] else float("inf")
r50 = l[1] / i[1] if i[1] else float("inf")
v = "met" if r99 <= 2 else "MISSED"
print(f"  ratio loaded / idle (a<-b): p99 {r99:.2f} (target at most 2: {v}), p50 {r50:.2f}")
print(f"SUMMARY latency: p99 idle {i[2] / 1000:.2f} ms, loaded {l[2] / 1000:.2f} ms, ratio {r99:.2f} (target <= 2: {v}); p50 {i[1] / 1000:.2f} -> {l[1] / 1000:.2f} ms")
EOF
    )
    grep -v '^SUMMARY' <<<"$line"
    summary+=("$(sed -n 's/^SUMMARY //p' <<<"$line")")
}

# --- 4. Idle cost.
idle_pct=""
idle_run() {
    local label=$1 links=$2 ic=$3
    start_pair "idle-$label" "$links" "$ic"
    sleep 5
    window "idle-$label" "$duration"
    idle_pct="${qemu_pct[a]} ${qemu_pct[b]}"
    echo "  $label: QEMU a ${qemu_pct[a]} %, b ${qemu_pct[b]} % of a core"
    stop_pair 0
}

idle() {
    local without with
    echo
    echo "== idle cost of the interconnect: an idle pair without it (links = 0, mailbox = false) and with the default (2 network links, mailbox, heartbeat 50 ms); ${duration} s after 5 s"
    idle_run "without" 0 "links = 0"$'\n'"mailbox = false"
    without=$idle_pct
    idle_run "default" 3 ""
    with=$idle_pct
    local line
    line=$(python3 - "$without" "$with" <<'EOF'
import sys
w0, w1 = ([float(x) for x in a.split()] for a in sys.argv[1:3])
m0, m1 = sum(w0) / len(w0), sum(w1) / len(w1)
r = m1 / m0 if m0 else float("inf")
print(f"  per guest, mean: without {m0:.1f} %, with {m1:.1f} % of a core: + {m1 - m0:.1f} points (ratio {r:.2f})")
print(f"SUMMARY idle: {m0:.1f} % of a core per guest without the interconnect, {m1:.1f} % with it: + {m1 - m0:.1f} points (ratio {r:.2f})")
EOF
    )
    grep -v '^SUMMARY' <<<"$line"
    summary+=("$(sed -n 's/^SUMMARY //p' <<<"$line")")
}

wanted failover && failover
wanted bulk && bulk
wanted latency && latency
wanted idle && idle

echo
echo "== summary ($(nproc) CPUs, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), accel ${accel:-unknown})"
for line in "${summary[@]}"; do echo "  $line"; done
if ((${#contention[@]} > 0)); then
    echo "  contention:"
    for line in "${contention[@]}"; do echo "    $line"; done
else
    echo "  contention: none seen (no other QEMU, the rest of the machine under 25 % of a core in every window)"
fi
# A stream that lost, repeated or reordered a message fails the run (figures are only printed).
((failed == 0))
