# shellcheck shell=bash
# Shared by the fio benchmarks (bench-nbd.sh, bench-bridge.sh, bench-guest-disks.sh): fio's NBD
# engine, medians of rounds, ratios. The caller sets $size, $runtime and $rounds, and defines
# `server_iops SERVER RW DEPTH` (one fio run against SERVER, printing its IOPS).

# fio_iops URI RW DEPTH [COMMAND PREFIX...]: one 4 KiB random run (1 s ramp) of fio's nbd
# engine against URI; prints its IOPS. A prefix such as `ip netns exec NS` runs fio there.
fio_iops() {
    local uri=$1 rw=$2 depth=$3 out
    shift 3
    out=$("$@" fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth="$depth" \
        --size="$size" --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 \
        --output-format=json 2>&1) || {
        echo "error: fio $rw qd$depth against $uri failed: $(tail -n 3 <<<"$out")" >&2
        return 1
    }
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(round(j["write"]["iops"] + j["read"]["iops"]))' <<<"$out"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

ratio() { python3 -c "print(f'{$1/$2:.2f}x')"; }

# bench_rounds SERVER...: random writes, then reads (a fresh disk reads as holes), at queue
# depths 1 and 16, on every server in turn, $rounds times; the median of each goes to
# iops[SERVER.RW.DEPTH] (declare -A iops first), every sample to stderr.
bench_rounds() {
    local rw depth server
    for rw in randwrite randread; do
        for depth in 1 16; do
            declare -A samples=()
            for _ in $(seq 1 "$rounds"); do
                for server in "$@"; do
                    samples[$server]+="$(server_iops "$server" "$rw" "$depth") "
                done
            done
            for server in "$@"; do
                # shellcheck disable=SC2086 # word splitting wanted
                iops[$server.$rw.$depth]=$(median ${samples[$server]})
                echo "  $rw qd$depth $server: ${samples[$server]}" >&2
            done
            unset samples
        done
    done
    echo >&2
}

# compare_table A B: the table of iops[A.*] against iops[B.*] for every workload, with B/A,
# and the note every two-pair benchmark ends with.
compare_table() {
    local rw depth a b
    printf '%-14s %10s %10s   %s\n' "workload" "$1" "$2" "$2/$1"
    for rw in randwrite randread; do
        for depth in 1 16; do
            a=${iops[$1.$rw.$depth]} b=${iops[$2.$rw.$depth]}
            printf '%-14s %10s %10s   %s\n' "$rw qd$depth" "$a" "$b" "$(ratio "$b" "$a")"
        done
    done
    echo
    echo "IOPS (higher is better), median of $rounds. Both pairs run on the same host at the same time"
}
