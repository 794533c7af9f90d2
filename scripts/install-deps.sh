#!/usr/bin/env bash
# Installs what building and testing ivha needs on a fresh Debian bookworm machine.
# Idempotent: installs only what is missing. Needs root (or sudo) for apt.
set -euo pipefail

# Debian packages the build and the tests use:
#   qemu-system-x86            runs the guests
#   busybox-static, cpio       the guest image (scripts/build-guest-image.sh)
#   qemu-utils, libnbd-bin     real NBD clients for the tests: qemu-io, qemu-img, nbdinfo, nbdcopy
#   nbdkit, fio                the NBD benchmark's peer server and load generator
packages=(build-essential pkg-config qemu-system-x86 busybox-static cpio qemu-utils libnbd-bin nbdkit fio)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

# The Rust toolchain comes with the machine; make sure its tools are all there.
for tool in cargo rustc "cargo fmt" "cargo clippy"; do
    if ! $tool --version >/dev/null 2>&1; then
        echo "error: '$tool' is missing: install a Rust toolchain (1.85 or newer) with rustfmt and clippy" >&2
        exit 1
    fi
done
echo "dependencies ok: $(rustc --version)"
