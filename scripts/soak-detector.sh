#!/usr/bin/env bash
# Soak of hostd's hang detector: a QEMU pair with the default [heartbeat] settings (phi
# accrual with its floor), both guests under full NBD write load (fio, libnbd engine) and a
# CPU hog on every host core, for DURATION_S seconds. No node may be judged down: any
# takeover is a false one. Prints, per node, the heartbeat interval distribution hostd
# saw, the highest phi, how often a late heartbeat was given more time (guest starved of
# CPU, or its log still moving), the guests' CPU shares, and the takeover count; exits 1
# on a false takeover. Always stops the pair, the load and the hogs, and removes the state
# directory. See docs/takeover.md ("Detecting a hang").
#
# Environment: DURATION_S (default 1800: 30 minutes; the figures come per whole minute),
# HOGS (CPU hogs, default: one per core), FIO_BS (default 64k), FIO_IODEPTH (default 8),
# HEARTBEAT (extra [heartbeat] lines, e.g. $'min_timeout_ms = 600'), KEEP_LOGS=DIR (copy
# hostd.log, events.jsonl and the consoles there first).
# Usage: [DURATION_S=120] scripts/soak-detector.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

duration=${DURATION_S:-1800}
hogs=${HOGS:-$(nproc)}
fio_bs=${FIO_BS:-64k}
fio_iodepth=${FIO_IODEPTH:-8}
die() { echo "soak-detector: error: $*" >&2; exit 2; }
for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done
((duration >= 60)) || die "DURATION_S must be at least 60 (hostd logs its figures once a minute)"

# Others may build on this machine too: do not take it from them.
nice cargo build --quiet -p hostd -p blkd -p guest-agent --bins
nice scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd

state=$(mktemp -d /dev/shm/ivha-soak.XXXXXX)
export IVHA_STATE_DIR=$state
load_pids=()
cleanup() {
    local status=$?
    for pid in "${load_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    close_pair "$status" "$hostd" "$state"
}
trap cleanup EXIT

port=$(free_port_pair 25809) || die "no two free ports found"
config=$state/ivha.toml
cat >"$config" <<EOF
[disks]
size_mib = 512
[heartbeat]
${HEARTBEAT:-}
$(pair_nodes "$port")
EOF
"$hostd" up --detach --config "$config" >/dev/null
echo "machine: $(nproc) CPUs, load: fio ${fio_bs} random writes at queue depth ${fio_iodepth} on both exports, ${hogs} CPU hogs; ${duration} s"
"$hostd" status | sed -n '1,3p'

for node in a b; do
    port_of=$([[ $node == a ]] && echo "$port" || echo $((port + 1)))
    fio --name="soak-$node" --ioengine=nbd --uri="nbd://127.0.0.1:$port_of/$node" \
        --rw=randwrite --bs="$fio_bs" --iodepth="$fio_iodepth" --size=256m \
        --time_based --runtime="$duration" --output="$state/fio-$node.txt" >/dev/null 2>&1 &
    load_pids+=($!)
done
for ((i = 0; i < hogs; i++)); do
    # At the default priority: the hogs compete with the guests as any busy tenant would.
    sh -c 'while :; do :; done' &
    load_pids+=($!)
done

started=$(date +%s)
while (($(date +%s) - started < duration)); do
    sleep 60 &
    wait $! || true
    elapsed=$(($(date +%s) - started))
    downs=$(grep -c '"to":"down"' "$state/events.jsonl" || true)
    nodes=$("$hostd" status --json | python3 -c '
import json, sys
print("  ".join("%s %s (heartbeat %s, served by %s)" % (n["name"], n["state"], n["heartbeat"], n["served_by"])
                for n in json.load(sys.stdin)["nodes"]))')
    echo "[$elapsed s] $nodes; node downs so far: $downs"
done
# hostd logs each node's figures once a minute: let the last whole minute be logged.
sleep 2

python3 - "$state" "$duration" <<'EOF'
import json, re, sys
from collections import defaultdict

state, duration = sys.argv[1], int(sys.argv[2])
figures = defaultdict(list)
for line in open(f"{state}/hostd.log", errors="replace"):
    m = re.search(r"node (\S+): heartbeat figures: (.*)", line)
    if m:
        figures[m.group(1)].append(dict(w.split("=", 1) for w in m.group(2).split()))
takeovers, downs = [], []
for line in open(f"{state}/events.jsonl"):
    e = json.loads(line)
    if e.get("event") == "takeover" and not e.get("planned"):
        takeovers.append(f'{e["node"]}: {e.get("reason", "")}')
    if e.get("event") == "node_state" and e.get("to") == "down":
        downs.append(f'{e["node"]}: {e.get("detail", "")}')
print()
print(f"heartbeat intervals hostd saw over {duration} s (whole minutes logged):")
for node, rows in sorted(figures.items()):
    hist = defaultdict(int)
    order = []
    for row in rows:
        for cell in row["histogram"].split(","):
            edge, count = cell.split(":")
            if edge not in order:
                order.append(edge)
            hist[edge] += int(count)
    n = sum(int(r["intervals"]) for r in rows)
    max_ms = max(int(r["max_ms"]) for r in rows)
    p99 = max(int(r["p99_ms"]) for r in rows)
    phis = [float(r["max_phi"]) for r in rows]
    deadlines = [int(r["deadline_ms"]) for r in rows]
    ran = [r["guest_cpu_ran_pct"] for r in rows]
    waited = [r["guest_cpu_waited_pct"] for r in rows]
    print(f"  node {node}: {n} intervals in {len(rows)} minutes; worst minute's p99 {p99} ms; longest {max_ms} ms")
    print(f"    histogram (ms): " + "  ".join(f"{e.replace('le', '<=')}: {hist[e]}" for e in order))
    print(f"    max phi {max(phis):.2f} (threshold {rows[-1]['phi_threshold']}; the floor holds a node Up below it)")
    print(f"    detector deadline per minute (ms): min {min(deadlines)} max {max(deadlines)}")
    print(f"    late heartbeats given more time: starved {sum(int(r['starved']) for r in rows)}, log still moving {sum(int(r['working']) for r in rows)}")
    print(f"    guest vCPU per minute: ran {','.join(ran)} %; waited for a CPU {','.join(waited)} %")
for node in ("a", "b"):
    try:
        text = open(f"{state}/fio-{node}.txt").read()
        m = re.search(r"WRITE: bw=(\S+)", text)
        print(f"  fio on {node}: write bandwidth {m.group(1) if m else '?'}")
    except OSError:
        print(f"  fio on {node}: no output")
print(f"takeovers: {len(takeovers)}; node downs: {len(downs)}")
for line in downs + takeovers:
    print(f"  FALSE: {line}")
sys.exit(1 if takeovers or downs else 0)
EOF
