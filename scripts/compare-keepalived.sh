#!/usr/bin/env bash
# ivha against keepalived, in one run: how long clients of an address wait when the node
# holding it dies, with the same client probe for both.
#   keepalived  a "lan" namespace with a bridge, two router namespaces joined to it by veths,
#               keepalived (VRRPv3, advert_int ADVERT_INT, priorities 150 and 100) in each
#               moving a VIP, and nbdkit (memory plugin) serving NBD on 0.0.0.0:10809 in each.
#               Fault: SIGKILL the master's keepalived (both processes) and nbdkit, and take
#               its veth down (a dead node's NIC goes, as a killed QEMU's tap does).
#               Covers VRRP's master-down timer + adding the VIP + gratuitous ARPs: an
#               address only, nothing is replayed and no data follows it.
#   ivha        a QEMU pair in bridge mode (its own namespace and bridge, made by hostd);
#               fault: `hostd kill a` (SIGKILL of a's QEMU). Covers detection (hostd sees
#               the QEMU exit; a silent node would wait for the heartbeat detector) + fencing
#               + the takeover's replay scan + b adding a's service IP + gratuitous ARPs.
# The probe (`ivha-campaign probe`) runs in the namespace on the bridge (the lan namespace;
# ivha's namespace), connects through the moving address, negotiates and reads 4 KiB at
# offset 0. It must succeed once before the fault; from the fault on it starts a new attempt
# every 10 ms (connect timeout 100 ms, each on its own connection). The time of a trial is
# from just before the kill to the end of the first successful read. Trials alternate
# (ivha, keepalived, ivha, ...); between trials the killed side is restored (ivha: `hostd
# giveback a`; keepalived: the dead router comes back and, having the higher priority,
# takes the VIP back). Prints every trial, p50 and max per side, and ivha p50 / keepalived
# p50. Needs root. Everything it makes (namespaces, processes, the pair) goes at exit.
#
# Environment: TRIALS (per side, default 5), ADVERT_INT (keepalived's advert_int in seconds,
# default 0.1), HOSTD (a hostd binary; default: build target/release/hostd and the guest
# image), CAMPAIGN (an ivha-campaign binary, for its probe; default: build it),
# IVHA_GUEST_DIR (the guest image hostd boots), KEEP_LOGS=DIR (copy hostd.log,
# events.jsonl, the consoles and keepalived's logs there at the end).
# FAULT=hang stops the node instead (SIGSTOP of the master's keepalived and nbdkit, its
# link left up; `hostd kill a --signal stop`), so each side has to notice the silence.
# Usage: [TRIALS=N] [FAULT=kill|hang] scripts/compare-keepalived.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh

trials=${TRIALS:-5}
advert_int=${ADVERT_INT:-0.1}
die() { echo "compare-keepalived: error: $*" >&2; exit 1; }
[[ $trials =~ ^[1-9][0-9]*$ ]] || die "TRIALS=$trials: a positive number"
fault=${FAULT:-kill}
[[ $fault == kill || $fault == hang ]] || die "FAULT=$fault: kill or hang"
((EUID == 0)) || die "needs root: it makes network namespaces, a bridge and veths"
for tool in ip keepalived nbdkit python3; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done

release_hostd
if [[ -n ${CAMPAIGN:-} ]]; then
    probe=$CAMPAIGN
else
    cargo build --release --quiet -p campaign --bin ivha-campaign
    probe=$target_dir/release/ivha-campaign
fi

# Names: this run's own (the process id keeps two runs apart).
tag=$$
lan=ivcmp-lan-$tag r1=ivcmp-r1-$tag r2=ivcmp-r2-$tag
ivha_ns=ivcmp-ivha-$tag ivha_br=ivcmp$((tag % 100000))
vip=10.76.0.10
for ns in "$lan" "$r1" "$r2" "$ivha_ns"; do
    [[ ! -e /run/netns/$ns ]] || die "network namespace $ns exists already"
done

work=$(mktemp -d /dev/shm/ivha-compare.XXXXXX)
state=$work/ivha
mkdir -p "$state"
export IVHA_STATE_DIR=$state
made_ns=()
cleanup() {
    local status=$? ns pid
    for ns in "${made_ns[@]}" "$ivha_ns"; do
        # Whatever still runs in our namespaces is ours (keepalived, nbdkit, probes).
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    end_pair "$status" "$hostd" "$state" 20
    if [[ -n ${KEEP_LOGS:-} ]]; then
        mkdir -p "$KEEP_LOGS"
        cp -r "$state/hostd.log" "$state/events.jsonl" "$state/consoles" "$work"/*.log "$KEEP_LOGS/" 2>/dev/null || true
        echo "logs kept in $KEEP_LOGS" >&2
    fi
    for ns in "${made_ns[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    [[ ! -e /run/netns/$ivha_ns ]] || ip netns del "$ivha_ns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 50 ms until it succeeds.
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.05
    done
}

# --- keepalived: lan 10.76.0.1 on bridge br0; routers 10.76.0.2 (r1, 150) and .3 (r2, 100).
ip netns add "$lan"
made_ns+=("$lan")
ip -n "$lan" link set lo up
ip -n "$lan" link add br0 type bridge
ip -n "$lan" addr add 10.76.0.1/24 dev br0
ip -n "$lan" link set br0 up
n=2
for router in "$r1" "$r2"; do
    ip netns add "$router"
    made_ns+=("$router")
    ip -n "$router" link set lo up
    ip -n "$router" link add eth0 type veth peer name "port$n" netns "$lan"
    ip -n "$router" addr add "10.76.0.$n/24" dev eth0
    ip -n "$router" link set eth0 up
    ip -n "$lan" link set "port$n" master br0 up
    n=$((n + 1))
done

# start_router NS PRIORITY: nbdkit and keepalived in router NS; their pids in $work/NS.*.
start_router() {
    local ns=$1 priority=$2
    cat >"$work/$ns.conf" <<EOF
global_defs {
    router_id $ns
    vrrp_version 3
}
vrrp_instance ivcmp {
    state BACKUP
    interface eth0
    virtual_router_id 76
    priority $priority
    advert_int $advert_int
    virtual_ipaddress {
        $vip/24 dev eth0
    }
}
EOF
    ip netns exec "$ns" nbdkit --exit-with-parent -f -P "$work/$ns.nbdkit.pid" -p 10809 memory 64M \
        >>"$work/$ns.nbdkit.log" 2>&1 &
    disown
    ip netns exec "$ns" keepalived -P -n -l -D -G -f "$work/$ns.conf" -p "$work/$ns.keepalived.pid" \
        -r "$work/$ns.vrrp.pid" >>"$work/$ns.keepalived.log" 2>&1 &
    disown
    wait_for 10 "$ns's keepalived and nbdkit" test -s "$work/$ns.vrrp.pid" -a -s "$work/$ns.nbdkit.pid"
    # Read now, so that the fault is only the signals.
    pids[$ns]="$(cat "$work/$ns.vrrp.pid") $(cat "$work/$ns.keepalived.pid") $(cat "$work/$ns.nbdkit.pid")"
}
declare -A pids
has_vip() { ip -n "$1" -o addr show dev eth0 | grep -q " $vip/"; }
vip_on_r1() { has_vip "$r1" && ! has_vip "$r2"; }
start_router "$r1" 150
start_router "$r2" 100
wait_for 20 "the VIP on $r1" vip_on_r1
grep -q "advert_int" "$work/$r1.keepalived.log" &&
    echo "keepalived about advert_int: $(grep -m1 advert_int "$work/$r1.keepalived.log")" >&2

# --- ivha: a pair in bridge mode.
cat >"$work/ivha.toml" <<EOF
[network]
mode = "bridge"
bridge = "$ivha_br"
netns = "$ivha_ns"
bridge_address = "10.77.0.1/24"
[metrics]
enabled = false
[[node]]
name = "a"
nbd_port = 20809
address = "10.77.0.2/24"
service_ip = "10.77.0.11/24"
[[node]]
name = "b"
nbd_port = 20810
address = "10.77.0.3/24"
service_ip = "10.77.0.12/24"
EOF
"$hostd" up --detach --config "$work/ivha.toml" >/dev/null
# a is served by a, up, and b can take it over.
a_ready() {
    "$hostd" status --json | python3 -c '
import json, sys
a = next(n for n in json.load(sys.stdin)["nodes"] if n["name"] == "a")
sys.exit(0 if a["served_by"] == "a" and a["state"] == "up" and a["takeover_possible"] else 1)'
}
wait_for 120 "node a up and served by a" a_ready
accel=$("$hostd" status --json | sed -n 's/^  "accel": "\(.*\)",$/\1/p')

# trial NS HOST FAULT...: starts the probe in NS against HOST, waits until it has read once,
# runs FAULT (timed from just before it), and prints the probe's milliseconds.
trial() {
    local ns=$1 host=$2 out=$work/probe.out trigger=$work/trigger start pid line ms
    shift 2
    rm -f "$out" "$trigger"
    ip netns exec "$ns" "$probe" probe "$host:10809" a --trigger "$trigger" \
        --interval-ms 10 --connect-timeout-ms 100 >"$out" 2>&1 &
    pid=$!
    wait_for 60 "the probe's first read through $host" grep -qs '^ready' "$out"
    start=$EPOCHREALTIME
    "$@"
    echo "$start" >"$trigger"
    wait "$pid" || die "probe in $ns: $(cat "$out")"
    line=$(grep '^ok ' "$out") || die "probe in $ns: $(cat "$out")"
    read -r _ ms _ <<<"$line"
    echo "$ms"
}
kill_r1() {
    # The VRRP child first: it must not see its parent go and resign (priority 0).
    # shellcheck disable=SC2086 # three pids
    kill -9 ${pids[$r1]}
    ip -n "$r1" link set eth0 down
}
restore_r1() {
    local pid
    # The killed processes are gone (nbdkit and keepalived are this shell's children).
    for pid in $(ip netns pids "$r1"); do kill -9 "$pid" 2>/dev/null || true; done
    # shellcheck disable=SC2086 # three pids; stopped ones go on to die
    kill -CONT ${pids[$r1]} 2>/dev/null || true
    wait_for 10 "$r1's processes to go" test -z "$(ip netns pids "$r1")"
    rm -f "$work/$r1".*.pid
    ip -n "$r1" addr del "$vip/24" dev eth0 2>/dev/null || true
    ip -n "$r1" link set eth0 up
    start_router "$r1" 150
    wait_for 20 "the VIP back on $r1" vip_on_r1
    sleep 0.5
}
# A hang: every process of the node stopped, its link up (nothing answers on it).
hang_r1() {
    # shellcheck disable=SC2086 # three pids
    kill -STOP ${pids[$r1]}
}
kill_a() { "$hostd" kill a >/dev/null; }
hang_a() { "$hostd" kill a --signal stop >/dev/null; }
restore_a() {
    "$hostd" giveback a >/dev/null
    wait_for 120 "node a up and served by a" a_ready
}

echo "ivha against keepalived: $fault the node holding the address, time to the first 4 KiB NBD read"
echo "through it (new attempt every 10 ms, connect timeout 100 ms), $trials trials each"
echo "  machine: $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), ivha accel ${accel:-unknown}"
echo "  $(keepalived --version 2>&1 | head -n 1); VRRPv3, advert_int $advert_int s, priorities 150/100"
echo
ivha_ms=() ka_ms=()
for ((i = 1; i <= trials; i++)); do
    ms=$(trial "$ivha_ns" 10.77.0.11 "${fault}_a")
    ivha_ms+=("$ms")
    printf 'trial %2d  ivha %6s ms' "$i" "$ms"
    ms=$(trial "$lan" "$vip" "${fault}_r1")
    ka_ms+=("$ms")
    printf '   keepalived %6s ms\n' "$ms"
    restore_a
    restore_r1
done

python3 - "${ivha_ms[*]}" "${ka_ms[*]}" <<'EOF'
import statistics, sys
ivha = [int(x) for x in sys.argv[1].split()]
ka = [int(x) for x in sys.argv[2].split()]
print()
for name, ms in (("ivha", ivha), ("keepalived", ka)):
    print(f"{name:<11} p50 {statistics.median(ms):7.0f} ms   max {max(ms):6d} ms   min {min(ms):6d} ms")
print(f"ratio ivha p50 / keepalived p50: {statistics.median(ivha) / statistics.median(ka):.2f}")
EOF
echo
echo "keepalived moves an address only (VRRP master-down timer, VIP added, gratuitous ARPs): the"
echo "data behind it (here a RAM disk per router) is not its business. ivha's time includes the"
echo "detection (a kill: the QEMU's exit; a hang: every QEMU thread stopped, both seen by hostd"
echo "at once; a node silent for another reason waits for the heartbeat detector), fencing, b's"
echo "scan of a's NVRAM log (serving while it replays) and b adding 10.77.0.11 with gratuitous ARPs."
