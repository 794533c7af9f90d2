# Sourced: progress of a loop of a known number of steps, on stderr, with an estimate of the
# time left: a bar when stderr is a terminal, a plain line per step otherwise (logs, CI).
# Usage: eta_start WHAT UNIT TOTAL; after each step: eta_step DONE.

eta_start() {
    eta_what=$1 eta_unit=$2 eta_total=$3 eta_t0=$SECONDS
}

# 45s, 3m05s, 1h02m.
eta_clock() {
    local s=$1
    if ((s < 60)); then
        printf '%ds' "$s"
    elif ((s < 3600)); then
        printf '%dm%02ds' $((s / 60)) $((s % 60))
    else
        printf '%dh%02dm' $((s / 3600)) $((s / 60 % 60))
    fi
}

eta_step() {
    local done=$1 elapsed=$((SECONDS - eta_t0)) line bar=""
    line="$eta_what: $done/$eta_total $eta_unit, $(eta_clock "$elapsed") elapsed"
    if ((done > 0 && done < eta_total)); then
        line+=", about $(eta_clock $((elapsed * (eta_total - done) / done))) left"
    fi
    if [[ -t 2 ]] && ((eta_total > 0)); then
        local width=20 filled hashes dots
        filled=$((done * width / eta_total))
        printf -v hashes '%*s' "$filled" ''
        printf -v dots '%*s' $((width - filled)) ''
        bar="[${hashes// /#}${dots// /.}] "
    fi
    printf '%s%s\n' "$bar" "$line" >&2
}
