#!/usr/bin/env bash
# Installs what building, running and testing ivha needs on Debian bookworm, then runs every
# tool the scripts and tests call and fails, naming the package, when one does not run.
#
# QEMU comes as one set from one release: the system emulator, qemu-utils (qemu-io, qemu-img)
# and the block modules. An image may carry qemu-utils from another release (bookworm-backports
# ships 10.0): installing qemu-system-x86 7.2 beside it makes apt remove it, since the two
# conflict. So the set is installed with explicit, equal versions whenever its installed
# versions differ, and the versions the tools report are compared afterwards.
#
# Idempotent; when nothing is missing it only checks (about a second). Needs root or sudo.
# Usage: scripts/install-deps.sh [--versions]   (--versions: also print each tool's version)
set -euo pipefail

show_versions=0
case ${1:-} in
"") ;;
--versions) show_versions=1 ;;
-h | --help)
    sed -n '2,12s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
*)
    echo "install-deps: error: unknown argument '$1' (try --help)" >&2
    exit 2
    ;;
esac

say() { echo "install-deps: $*"; }
die() {
    echo "install-deps: error: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"

# The QEMU set: installed together at the version of qemu-system-x86 that apt offers.
qemu_set=(qemu-system-x86 qemu-utils qemu-block-extra)
# Everything else (command -> package in the table below).
other_packages=(build-essential busybox-static cpio kmod xz-utils libnbd-bin nbdkit fio python3 python3-prometheus-client e2fsprogs iproute2 keepalived)

# Each tool the project runs: "package|command that must succeed".
checks=(
    "qemu-system-x86|qemu-system-x86_64 --version"
    "qemu-utils|qemu-io --version"
    "qemu-utils|qemu-img --version"
    "libnbd-bin|nbdinfo --version"
    "libnbd-bin|nbdcopy --version"
    "nbdkit|nbdkit --version"
    "nbdkit|nbdkit --dump-plugin file"
    "nbdkit|nbdkit --dump-plugin memory"
    "fio|fio --version"
    "fio|fio --enghelp=nbd"
    "busybox-static|/bin/busybox true"
    "cpio|cpio --version"
    "kmod|depmod --version"
    "e2fsprogs|mke2fs -V" # the client VM's filesystem (scripts/client-vm.sh, docs/clients.md)
    "e2fsprogs|e2fsck -V"
    "e2fsprogs|debugfs -V"
    "e2fsprogs|dumpe2fs -V"
    "xz-utils|xz --version"
    "python3|python3 --version"
    # Debian's module serves Debian's python3, whatever python3 comes first in PATH.
    "python3-prometheus-client|/usr/bin/python3 -m prometheus_client.parser" # hostd/tests/metrics.rs
    "python3-prometheus-client|/usr/bin/python3 -m prometheus_client.openmetrics.parser"
    "iproute2|ip -V" # bridge mode: namespaces, bridges, taps (hostd/src/network.rs)
    "keepalived|keepalived --version" # the peer of bridge mode's moving IP (scripts/compare-keepalived.sh)
    "build-essential|cc --version"
    "build-essential|c++ --version" # libFuzzer's runtime, for scripts/fuzz.sh
)

apt_install() {
    local out
    say "installing: $*"
    if ! out=$(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends --allow-downgrades "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "apt-get install failed (above) for: $*"
    fi
}
installed_version() {
    local status
    status=$(dpkg-query -W -f='${Status}|${Version}' "$1" 2>/dev/null) || return 0
    [[ $status == "install ok installed|"* ]] && echo "${status#*|}"
    return 0
}
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }'
}

# --- 1. The QEMU set ------------------------------------------------------------------------
versions=()
for p in "${qemu_set[@]}"; do
    versions+=("$(installed_version "$p")")
done
consistent=1
for v in "${versions[@]}"; do
    [[ -n $v && $v == "${versions[0]}" ]] || consistent=0
done
if ((consistent == 0)); then
    # Fresh lists: the versions a stale list names may be gone from the archive.
    apt_update_once
    want=$(candidate_version qemu-system-x86)
    [[ -n $want ]] || die "apt offers no qemu-system-x86: is a Debian bookworm source configured?"
    have=""
    for i in "${!qemu_set[@]}"; do
        have+=" ${qemu_set[$i]}=${versions[$i]:-none}"
    done
    say "QEMU set is not one release (${have# }); installing $want"
    pinned=()
    for p in "${qemu_set[@]}"; do pinned+=("$p=$want"); done
    apt_install "${pinned[@]}"
fi

# --- 2. Everything else ---------------------------------------------------------------------
missing=()
for p in "${other_packages[@]}"; do
    [[ -n $(installed_version "$p") ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    apt_update_once
    apt_install "${missing[@]}"
fi

# --- 3. Every tool runs ---------------------------------------------------------------------
failed=()
for check in "${checks[@]}"; do
    pkg=${check%%|*}
    cmd=${check#*|}
    # shellcheck disable=SC2086 # the command is a word list on purpose
    if ! out=$($cmd 2>&1 </dev/null); then
        failed+=("'$cmd' does not run (package $pkg): ${out%%$'\n'*}")
    elif ((show_versions)) && [[ $cmd == *--version ]]; then
        printf '  %-22s %s\n' "${cmd%% *}" "$(grep -m1 . <<<"$out")"
    fi
done
# The QEMU tools must be the release of the emulator (they share block drivers and QMP).
qemu_release() { "$@" --version 2>/dev/null | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p'; }
system_release=$(qemu_release qemu-system-x86_64 || true)
for tool in qemu-io qemu-img; do
    release=$(qemu_release "$tool" || true)
    if [[ -n $release && -n $system_release && $release != "$system_release" ]]; then
        failed+=("$tool is QEMU $release but qemu-system-x86_64 is $system_release: reinstall qemu-utils at the version of qemu-system-x86")
    fi
done
if ((${#failed[@]})); then
    for f in "${failed[@]}"; do echo "install-deps: error: $f" >&2; done
    exit 1
fi

# --- 4. The Rust toolchain comes with the machine ---------------------------------------------
for tool in cargo rustc "cargo fmt" "cargo clippy"; do
    # shellcheck disable=SC2086
    $tool --version >/dev/null 2>&1 ||
        die "'$tool' is missing: install a Rust toolchain (1.85 or newer) with rustfmt and clippy"
done
if ((show_versions)); then
    printf '  %-22s %s\n' rustc "$(rustc --version)"
    for p in "${qemu_set[@]}" busybox-static libnbd-bin nbdkit fio python3-prometheus-client; do
        printf '  %-22s %s\n' "$p" "$(installed_version "$p")"
    done
fi
echo "dependencies ok: QEMU $system_release, $(rustc --version)"
