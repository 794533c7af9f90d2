# Sourced by the scripts that install Debian packages, after they define say and die.

# Root runs apt-get directly; anyone else through sudo, asked for only when something is missing.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

apt_updated=0
# `apt-get update`, at most once per run; a failure only warns (the lists there are used).
apt_update_once() {
    if ((apt_updated == 0)); then
        apt_updated=1
        say "apt-get update"
        as_root apt-get update -qq || say "warning: apt-get update failed; using the package lists as they are"
    fi
    return 0
}
