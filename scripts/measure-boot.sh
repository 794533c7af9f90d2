#!/usr/bin/env bash
# Measures `hostd up --detach` until every agent is up, N times (default 5), and prints
# each time and the median. NODES (2 to 8, default 2) guests. Needs the guest image
# (scripts/build-guest-image.sh).
# Usage: [NODES=3] scripts/measure-boot.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh
. scripts/lib/eta.sh
. scripts/lib/pair.sh

runs=${1:-5}
nodes=${NODES:-2}
[[ $nodes =~ ^[2-8]$ ]] || { echo "measure-boot: error: NODES=$nodes: 2 to 8 nodes" >&2; exit 1; }
cargo build --release --quiet -p hostd --bin hostd -p blkd --bin ivha-blkd
hostd=$target_dir/release/hostd
state=$(mktemp -d /dev/shm/ivha-measure.XXXXXX)
config=$state.toml
trap 'IVHA_STATE_DIR=$state "$hostd" down --purge >/dev/null 2>&1 || true; rm -rf "$state" "$config"' EXIT
{
    printf '[regions]\nnode_mib = 64\n'
    cluster_nodes 20809 "$nodes"
} >"$config"

times=()
eta_start measure-boot runs "$runs"
for i in $(seq 1 "$runs"); do
    start=$(date +%s.%N)
    IVHA_STATE_DIR=$state "$hostd" up --detach --config "$config" >/dev/null
    end=$(date +%s.%N)
    t=$(awk "BEGIN { print $end - $start }")
    times+=("$t")
    printf 'run %d: %.2f s from `hostd up` to all %d agents up\n' "$i" "$t" "$nodes"
    IVHA_STATE_DIR=$state "$hostd" down >/dev/null
    eta_step "$i"
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "median of %d: %.2f s (min %.2f, max %.2f)\n", NR, (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2), a[1], a[NR]}'
