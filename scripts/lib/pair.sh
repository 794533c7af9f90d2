# Shared by the scripts that run a pair of their own (sourced, not run).

# free_ports COUNT START: prints the first of COUNT consecutive free loopback ports at or
# after START.
free_ports() {
    local count=$1 port=$2 i
    while ((port + count <= 65000)); do
        for ((i = 0; i < count; i++)); do
            (exec 3<>"/dev/tcp/127.0.0.1/$((port + i))") 2>/dev/null && break
        done
        if ((i == count)); then
            echo "$port"
            return 0
        fi
        port=$((port + i + 1))
    done
    return 1
}

# Prints the first of two consecutive free loopback ports at or after $1.
free_port_pair() {
    free_ports 2 "$1"
}

# end_pair STATUS HOSTD STATE LINES: after a failed run (STATUS != 0) shows the last LINES
# lines of hostd's log; then stops the pair and deletes its regions and disks.
end_pair() {
    local status=$1 hostd=$2 state=$3 lines=$4
    if ((status != 0)) && [[ -s $state/hostd.log ]]; then
        echo "--- last lines of $state/hostd.log:" >&2
        tail -n "$lines" "$state/hostd.log" >&2
    fi
    IVHA_STATE_DIR=$state "$hostd" down --purge >/dev/null 2>&1 || true
}

# close_pair STATUS HOSTD STATE: end_pair (20 lines of hostd's log after a failure), then,
# if KEEP_LOGS names a directory, copies hostd.log, events.jsonl and the consoles there,
# and removes the state directory.
close_pair() {
    local status=$1 hostd=$2 state=$3
    end_pair "$status" "$hostd" "$state" 20
    if [[ -n ${KEEP_LOGS:-} ]]; then
        mkdir -p "$KEEP_LOGS"
        cp -r "$state/hostd.log" "$state/events.jsonl" "$state/consoles" "$KEEP_LOGS/" 2>/dev/null || true
        echo "logs kept in $KEEP_LOGS" >&2
    fi
    rm -rf "$state"
}

# cluster_nodes PORT COUNT: the [[node]] sections of nodes a, b, c, ... (COUNT of them,
# 2 to 8), serving on PORT, PORT + 1, ...
cluster_nodes() {
    local names=(a b c d e f g h) i
    for ((i = 0; i < $2; i++)); do
        printf '[[node]]\nname = "%s"\nnbd_port = %s\n' "${names[i]}" $(($1 + i))
    done
}

# pair_nodes PORT: the [[node]] sections of nodes a and b, serving on PORT and PORT + 1.
pair_nodes() {
    cluster_nodes "$1" 2
}

# release_hostd: sets $hostd to $HOSTD if given (its guest image from IVHA_GUEST_DIR), else
# builds hostd, the agent and the guest image of this tree (release) and uses that hostd.
# Needs scripts/lib/target.sh.
release_hostd() {
    if [[ -n ${HOSTD:-} ]]; then
        hostd=$HOSTD
    else
        cargo build --release --quiet -p hostd --bin hostd -p blkd --bin ivha-blkd -p guest-agent --bin guest-agent
        scripts/build-guest-image.sh >/dev/null
        hostd=$target_dir/release/hostd
    fi
    [[ -x $hostd ]] || {
        echo "error: HOSTD=$hostd is not an executable" >&2
        exit 1
    }
}
