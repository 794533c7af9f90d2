#!/usr/bin/env bash
# Tests scripts/install-deps.sh against the machine states that broke the set-up before: it
# changes this machine's packages, so CI runs it (.ci/run), not scripts/test.sh.
#   1. qemu-utils removed with dpkg: install-deps must bring back a working qemu-io.
#   2. Today's image: qemu-utils 10.0 from bookworm-backports, no qemu-system-x86, no
#      qemu-block-extra. Installing the emulator from bookworm makes apt remove that
#      qemu-utils; install-deps must end with one QEMU set that has qemu-io.
# Each case ends with a real qemu-io and qemu-img run and a check that the QEMU packages are
# of one version. Needs root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[[ $(id -u) -eq 0 ]] || { echo "test-setup: error: needs root (it removes and installs packages)" >&2; exit 1; }

passed=0 failed=0
say() { echo "test-setup: $*"; }
fail() {
    echo "test-setup: FAILED: $*" >&2
    failed=$((failed + 1))
}
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

# After install-deps: every QEMU tool runs and reads a real image, and the set is one version.
check_qemu_set() {
    local name=$1 img out v
    img=$(mktemp)
    out=$(qemu-img create -q -f raw "$img" 1M 2>&1 &&
        qemu-io -f raw -c 'write -P 0x5a 0 64k' -c 'read -P 0x5a 0 64k' "$img" 2>&1) || out="FAILED $out"
    rm -f "$img"
    if [[ $out == FAILED* ]] || grep -q 'Pattern verification failed' <<<"$out"; then
        fail "$name: qemu-img/qemu-io do not work after install-deps: $out"
        return
    fi
    if ! qemu-system-x86_64 --version >/dev/null 2>&1; then
        fail "$name: qemu-system-x86_64 does not run after install-deps"
        return
    fi
    v=$(version_of qemu-system-x86)
    for p in qemu-utils qemu-block-extra; do
        if [[ $(version_of "$p") != "$v" ]]; then
            fail "$name: $p is $(version_of "$p"), qemu-system-x86 is $v"
            return
        fi
    done
    say "ok: $name (QEMU set $v; qemu-io wrote and read back 64 KiB)"
    passed=$((passed + 1))
}
run_install_deps() {
    local name=$1 out
    if ! out=$(scripts/install-deps.sh 2>&1); then
        printf '%s\n' "$out" >&2
        fail "$name: install-deps failed"
        return 1
    fi
    printf '%s\n' "$out" | sed 's/^/    /'
}

# Make sure the starting point is sound, so a failure below is the case's own.
scripts/install-deps.sh >/dev/null

say "case 1: qemu-utils removed with dpkg"
dpkg --remove --force-depends qemu-utils >/dev/null 2>&1
if command -v qemu-io >/dev/null; then
    fail "case 1: qemu-io still exists after removing qemu-utils: the case tests nothing"
elif run_install_deps "case 1"; then
    check_qemu_set "case 1"
fi

say "case 2: today's image: qemu-utils from bookworm-backports, no emulator, no block modules"
# Backports through a private source list and list directory: the machine's own apt
# configuration is not touched.
apt_dir=$(mktemp -d)
trap 'rm -rf "$apt_dir"' EXIT
mkdir -p "$apt_dir/lists/partial"
printf 'deb http://deb.debian.org/debian %s main\n' bookworm bookworm-backports >"$apt_dir/sources.list"
private_apt=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=- -o Dir::State::Lists="$apt_dir/lists")
if ! out=$(apt-get update -qq "${private_apt[@]}" 2>&1) ||
    ! backports=$(apt-cache "${private_apt[@]}" madison qemu-utils | awk -F' *[|] *' '$3 ~ /backports/ { print $2; exit }') ||
    [[ -z $backports ]]; then
    printf '%s\n' "$out" >&2
    fail "case 2: cannot reach bookworm-backports' qemu-utils to set the case up"
elif ! out=$(DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq qemu-system-x86 qemu-block-extra 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${private_apt[@]}" \
        "qemu-utils=$backports" 2>&1); then
    printf '%s\n' "$out" >&2
    fail "case 2: cannot install qemu-utils $backports"
elif [[ $(version_of qemu-utils) != "$backports" || -n $(version_of qemu-system-x86) ]]; then
    fail "case 2: set-up did not take (qemu-utils $(version_of qemu-utils), qemu-system-x86 '$(version_of qemu-system-x86)')"
else
    say "set up: qemu-utils $backports alone"
    run_install_deps "case 2" && check_qemu_set "case 2"
fi

# Leave the machine as sound as it was found, whatever happened above.
scripts/install-deps.sh >/dev/null || fail "install-deps fails on the final state"
echo
echo "setup: $passed passed, $failed failed"
((failed == 0))
