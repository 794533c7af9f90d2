#!/usr/bin/env bash
# Measures the hang that stops nothing hostd can see from outside: the guest agent of node a
# stopped (SIGSTOP) inside its guest, whose kernel goes on running. Starts a QEMU pair with
# the default [heartbeat] settings; TRIALS times: lets the detector learn the new boot's
# intervals (SETTLE_S), stops a's agent through a's guest shell, and times from the moment
# the shell ran the command: hostd's `down` event, and the first good NBD read (qemu-io)
# through a's address, served by b; then `hostd giveback a`. Prints one line per trial and
# the p50. Always stops the pair and removes its state directory.
#
# Environment: TRIALS (default 5), SETTLE_S (20), KEEP_LOGS=DIR.
# Usage: [TRIALS=N] scripts/measure-agent-stop.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/pair.sh
. scripts/lib/target.sh
. scripts/lib/eta.sh

trials=${TRIALS:-5}
settle=${SETTLE_S:-20}
die() { echo "measure-agent-stop: error: $*" >&2; exit 1; }
for tool in python3 qemu-io; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done

nice cargo build --quiet -p hostd -p blkd -p guest-agent --bins
nice scripts/build-guest-image.sh >/dev/null
hostd=$target_dir/debug/hostd

state=$(mktemp -d /dev/shm/ivha-agent-stop.XXXXXX)
export IVHA_STATE_DIR=$state
cleanup() {
    local status=$?
    close_pair "$status" "$hostd" "$state"
}
trap cleanup EXIT

port=$(free_port_pair 26809) || die "no two free ports found"
cat >"$state/ivha.toml" <<EOF
[disks]
size_mib = 256
$(pair_nodes "$port")
EOF
"$hostd" up --detach --config "$state/ivha.toml" >/dev/null
echo "machine: $(nproc) CPUs, default [heartbeat] settings; times from the guest shell's stop of a's agent"

results=()
eta_start measure-agent-stop trials "$trials"
for ((trial = 1; trial <= trials; trial++)); do
    sleep "$settle"
    line=$(python3 - "$state" "$port" <<'PY'
import json, os, socket, subprocess, sys, time

state, port = sys.argv[1], int(sys.argv[2])
shell = socket.socket(socket.AF_UNIX)
shell.connect(os.path.join(state, "qmp", "a.shell.sock"))
marker = f"ivha-stopped-{time.time_ns() % 1000000}"
# The marker is split so that the shell's echo of the command line does not match it.
shell.sendall(f"\nkill -STOP $(pidof guest-agent) && echo {marker[:5]}''{marker[5:]}\n".encode())
seen = b""
shell.settimeout(10)
while marker.encode() not in seen:
    seen += shell.recv(4096)
t0 = time.time()
shell.close()
first_read = None
while time.time() - t0 < 30:
    done = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4096",
                           f"nbd://127.0.0.1:{port}/a"], capture_output=True, timeout=10)
    if done.returncode == 0 and b"read 4096/4096" in done.stdout:
        first_read = time.time()
        break
    time.sleep(0.005)
down, reason = None, ""
for text in open(os.path.join(state, "events.jsonl")):
    event = json.loads(text)
    if (event.get("event") == "node_state" and event.get("node") == "a"
            and event.get("to") == "down" and event["time_unix_us"] / 1e6 >= t0 - 1):
        down, reason = event["time_unix_us"] / 1e6, event.get("detail", "")
        break
ms = lambda t: "-" if t is None else f"{(t - t0) * 1000:.0f}"
print(f"{ms(first_read)} down +{ms(down)} ms: {reason}")
PY
)
    echo "trial $trial: first good read +${line%% *} ms after the stop; ${line#* }"
    results+=("${line%% *}")
    "$hostd" giveback a >/dev/null
    eta_step "$trial"
done
printf '%s\n' "${results[@]}" | grep -v '^-$' | sort -n | awk '
    { v[NR] = $1 } END { if (NR) printf "p50 of %d: %s ms (target: under 1500 ms)\n", NR, v[int((NR + 1) / 2)] }'
