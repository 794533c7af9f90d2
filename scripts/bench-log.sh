#!/usr/bin/env bash
# Latency of an ivha log append next to a TCP loopback round trip and an fdatasync'd write.
#
# Usage: scripts/bench-log.sh [--criterion] [--quick] [ARGS...]
#   --criterion  also run the criterion throughput bench of try_append (benches/append.rs)
#   --quick      tiny sample counts: a smoke run, figures are not meaningful
#   ARGS         passed on to the latency_table binary (unknown ones are ignored)
# Environment (see shm/benches/latency_table.rs):
#   IVHA_BENCH_SAMPLES       samples per size for append and tcp (default 20000)
#   IVHA_BENCH_SYNC_SAMPLES  samples per size for fdatasync (default 400)
#   IVHA_BENCH_QUICK=1       same as --quick
#   IVHA_BENCH_SYNC_DIR      directory for the fdatasync file (default: cargo's target dir;
#                            must be on a real disk, not tmpfs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

criterion=0
args=()
for arg in "$@"; do
    case "$arg" in
        --criterion) criterion=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done

echo "== ivha log latency: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(uname -sr), $(nproc) cores"
echo "== cargo bench -p shm --bench latency_table ${args[*]:-}"
cargo bench -p shm --bench latency_table -- "${args[@]}"

if [[ $criterion == 1 ]]; then
    echo
    echo "== cargo bench -p shm --bench append (criterion)"
    cargo bench -p shm --bench append
fi
