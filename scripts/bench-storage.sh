#!/usr/bin/env bash
# Storage benchmark: fio inside a guest, 4 KiB random writes and reads at queue depth 1 and 16
# (libaio, O_DIRECT, time based), on two virtio-blk disks of the same guest, in one run:
#   blkd  a 256 MiB raw image served by ivha-blkd over vhost-user-blk (guest RAM in a shared
#         memfd, as vhost-user needs; node 0 registered on the disk before fio writes)
#   qemu  a copy of the same image on QEMU's built-in virtio-blk, cache=writeback (what ivha's
#         guests used so far)
# Both images are written in full first (random bytes), so reads hit data, not holes.
#
# One guest boot per round, with both disks attached: under TCG a boot and loading fio's
# shared libraries (~85 MB appended to the initramfs) cost far more than a workload, and one
# guest for both disks means the same kernel, page cache and vCPU state for both. Inside the
# boot each workload runs on the two disks back to back, blkd first in odd rounds and qemu
# first in even ones, so drift (host page cache, writeback, thermal) affects both. The idle
# disk costs nothing. The medians over ROUNDS are reported, each sample on stderr.
#
# The guest is the client image (scripts/build-guest-image.sh) plus an appended cpio with
# fio, the libraries `ldd` lists, the dynamic loader and our /init, which loads the image's
# modules like the client's /init, runs fio on the disks (found by serial) and prints
# "BENCH result KIND RW DEPTH IOPS" lines on the serial console, then powers off.
#
# Environment: ROUNDS (default 3), RUNTIME (seconds per fio job after a 1 s ramp, default 5),
# IVHA_BENCH_DIR (where the images go, default TARGET/bench-storage), GUEST_MEM (MiB, 512),
# IVHA_ACCEL (kvm|tcg; default kvm only when usable, as hostd decides). On a failure the
# consoles and logs are kept in IVHA_BENCH_DIR/failed.N/.
# Takes about ROUNDS * (15 + 8 * (RUNTIME + 1)) s under TCG on 2 cores (3m10s for 3 and 5), plus the build.
# Usage: [ROUNDS=3] [RUNTIME=5] scripts/bench-storage.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh
. scripts/lib/bench.sh

say() { echo "bench-storage: $*" >&2; }
die() {
    echo "bench-storage: error: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib/apt.sh
. scripts/lib/apt.sh

rounds=${ROUNDS:-3}
runtime=${RUNTIME:-5}
guest_mem=${GUEST_MEM:-512}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer (got '$rounds')"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "RUNTIME must be a positive integer (got '$runtime')"
[[ $guest_mem =~ ^[1-9][0-9]*$ ]] || die "GUEST_MEM must be a positive integer (MiB, got '$guest_mem')"

# --- Prerequisites ----------------------------------------------------------------------------
qemu="qemu-system-x86_64"
command -v "$qemu" >/dev/null ||
    die "$qemu is missing: run scripts/install-deps.sh (Debian: apt-get install qemu-system-x86)"
qemu_version=$("$qemu" --version | head -n1) || die "$qemu does not run"
guest=$target_dir/guest
kernel=$guest/vmlinuz
client_initramfs=$guest/client-initramfs.cpio.gz
for file in "$kernel" "$client_initramfs"; do
    [[ -f $file ]] || die "the guest image is missing: $file (build it with scripts/build-guest-image.sh)"
done
for tool in python3 cpio ldd cargo; do
    command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done
# This bench is not in CI, so scripts/install-deps.sh is not asked for fio: install it here.
if ! command -v fio >/dev/null; then
    apt_update_once
    say "installing fio"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >&2 || die "cannot install fio"
fi
fio_bin=$(command -v fio)
fio_version=$(fio --version)

say "building ivha-blkd (release)"
cargo build --release --quiet -p blkd --bin ivha-blkd || die "building ivha-blkd failed"
blkd=$target_dir/release/ivha-blkd
[[ -x $blkd ]] || die "cargo did not produce $blkd"

# As qemu/src/accel.rs decides: /dev/kvm alone is not enough (without vmx/svm in the CPU
# flags, nested setups hang the guest at boot). IVHA_ACCEL=kvm|tcg overrides.
accel=${IVHA_ACCEL:-}
if [[ -z $accel ]]; then
    accel=tcg
    [[ -r /dev/kvm && -w /dev/kvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo && accel=kvm
fi
[[ $accel == kvm || $accel == tcg ]] || die "IVHA_ACCEL must be kvm or tcg (got '$accel')"

# --- Work directory, cleanup ------------------------------------------------------------------
work=${IVHA_BENCH_DIR:-$target_dir/bench-storage}
mkdir -p "$work"
run=$(mktemp -d "$(realpath "$work")/run.XXXXXX")
blkd_pid=""
qemu_pid=""
cleanup() {
    local status=$?
    if [[ -n $qemu_pid ]]; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [[ -n $blkd_pid ]]; then
        kill "$blkd_pid" 2>/dev/null || true
        wait "$blkd_pid" 2>/dev/null || true
    fi
    if ((status != 0)) && compgen -G "$run/*.log" >/dev/null; then
        local kept
        kept=$(mktemp -d "$work/failed.XXXXXX")
        cp "$run"/*.log "$run/plan.json" "$kept/" 2>/dev/null || true
        echo "bench-storage: logs and consoles kept in $kept" >&2
    fi
    rm -rf "$run"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

control=$run/control.sock
vhost_socket=$run/bench-0.sock
# sun_path holds 108 bytes with the terminating NUL.
((${#vhost_socket} < 100)) || die "$run is too deep for a unix socket path: set IVHA_BENCH_DIR shorter"

# --- Images -------------------------------------------------------------------------------------
size_mib=256
blkd_img=$run/blkd.img
qemu_img=$run/qemu.img
say "writing the $size_mib MiB image (random bytes) and its copy in $run"
truncate -s "${size_mib}M" "$blkd_img"
dd if=/dev/urandom of="$blkd_img" bs=1M count="$size_mib" conv=notrunc status=none
cp --sparse=never "$blkd_img" "$qemu_img"
sync

# --- The guest's initramfs: the client image + fio, its libraries, our /init -----------------
blkd_serial=ivha-bench-blkd
qemu_serial=ivha-bench-qemu
fio_args="--ioengine=libaio --direct=1 --bs=4k --time_based --ramp_time=1 --randrepeat=0 --output-format=terse --terse-version=3"
root=$run/root
mkdir -p "$root/bin" "$root/lib64" "$root/lib/x86_64-linux-gnu"
cp -L "$fio_bin" "$root/bin/fio"
ldd_out=$(ldd "$fio_bin")
if grep -q 'not found' <<<"$ldd_out"; then
    die "fio's libraries are not all installed: $(grep 'not found' <<<"$ldd_out" | xargs)"
fi
# "libx.so.1 => /path (0x...)" and the loader's "/lib64/ld-linux-x86-64.so.2 (0x...)": every
# library goes flat into /lib/x86_64-linux-gnu (on LD_LIBRARY_PATH), the loader where the
# binary's PT_INTERP says.
while read -r lib; do
    cp -L "$lib" "$root/lib/x86_64-linux-gnu/"
done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 }' <<<"$ldd_out")
interp=$(awk '$1 ~ /^\// && $2 ~ /^\(0x/ { print $1 }' <<<"$ldd_out")
[[ -n $interp ]] || die "ldd names no dynamic loader for $fio_bin"
mkdir -p "$root/$(dirname "$interp")"
cp -L "$interp" "$root/$interp"

cat >"$root/init" <<EOF
#!/bin/sh
# bench-storage's guest /init (busybox sh, PID 1). Kernel command line:
# ivha_bench.runtime=SECONDS ivha_bench.order=KIND,KIND. Report lines start with "BENCH ".
PATH=/bin:/sbin:/usr/bin:/usr/sbin
LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export PATH LD_LIBRARY_PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
say() { echo "BENCH \$*"; }
finish() {
    sync
    poweroff -f
    while :; do sleep 3600; done
}
# Modules as the client's /init loads them (virtio_pci, virtio_blk are modules there).
moddir=/lib/modules/\$(uname -r)
[ -f "\$moddir/load-order" ] || { say "error no \$moddir/load-order: image built for another kernel"; finish; }
while read -r mod; do
    [ -d "/sys/module/\$mod" ] && continue
    out=\$(insmod "\$moddir/\$mod.ko" 2>&1) || say "error insmod \$mod: \$out"
done <"\$moddir/load-order"
runtime=5
order="blkd qemu"
set -f
# shellcheck disable=SC2013 # words, not lines
for word in \$(cat /proc/cmdline); do
    case "\$word" in
    ivha_bench.runtime=*) runtime=\${word#*=} ;;
    ivha_bench.order=*) order=\$(echo "\${word#*=}" | tr , ' ') ;;
    esac
done
set +f
# The disk whose virtio-blk serial is \$1.
dev_of() {
    for d in /sys/block/vd*; do
        [ "\$(cat "\$d/serial" 2>/dev/null)" = "\$1" ] && { echo "/dev/\${d##*/}"; return 0; }
    done
    return 1
}
tries=0
while ! { dev_of $blkd_serial && dev_of $qemu_serial; } >/dev/null && [ \$tries -lt 300 ]; do
    sleep 0.1
    tries=\$((tries + 1))
done
blkd=\$(dev_of $blkd_serial) || { say "error no disk with serial $blkd_serial"; finish; }
qemu=\$(dev_of $qemu_serial) || { say "error no disk with serial $qemu_serial"; finish; }
say "disks blkd=\$blkd qemu=\$qemu wce=\$(cat "/sys/block/\${blkd#/dev/}/queue/write_cache"),\$(cat "/sys/block/\${qemu#/dev/}/queue/write_cache")"
/bin/fio --version >/dev/null 2>&1 || { say "error fio does not run: \$(/bin/fio --version 2>&1 | tail -n 2 | tr '\n' ' ')"; finish; }
for rw in randwrite randread; do
    for depth in 1 16; do
        for kind in \$order; do
            case \$kind in
            blkd) dev=\$blkd ;;
            *) dev=\$qemu ;;
            esac
            out=\$(/bin/fio --name=bench --filename="\$dev" --rw="\$rw" --iodepth="\$depth" --runtime="\$runtime" $fio_args 2>&1)
            status=\$?
            line=\$(echo "\$out" | grep '^3;' | tail -n 1)
            error=\$(echo "\$line" | awk -F';' '{ print \$5 }')
            if [ \$status -ne 0 ] || [ -z "\$line" ] || [ "\$error" != 0 ]; then
                say "error \$kind \$rw \$depth fio status \$status error '\$error': \$(echo "\$out" | grep -v '^3;' | tail -n 4 | tr '\n' ' ')"
                dmesg | tail -n 5 | sed 's/^/BENCH dmesg /'
                continue
            fi
            say "result \$kind \$rw \$depth \$(echo "\$line" | awk -F';' '{ printf "%.0f", \$8 + \$49 }')"
        done
    done
done
say "done"
finish
EOF
chmod 0755 "$root/init"
# The client image (gzip), padded (the kernel looks for the next archive on a 4-byte
# boundary and skips zeroes), then ours uncompressed: gunzip under TCG would cost seconds.
initrd=$run/initrd.cpio
cp "$client_initramfs" "$initrd"
pad=$(((512 - $(stat -c %s "$initrd") % 512) % 512))
head -c "$pad" /dev/zero >>"$initrd"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >>"$initrd" ||
    die "cannot build the guest's cpio archive"
rm -rf "$root"

# --- The daemon ---------------------------------------------------------------------------------
plan=$run/plan.json
cat >"$plan" <<EOF
{
  "control_socket": "$control",
  "reservations": "$run/reservations.json",
  "disks": [
    {
      "name": "bench",
      "path": "$blkd_img",
      "serial": "$blkd_serial",
      "attachments": [{ "node": 0, "socket": "$vhost_socket" }]
    }
  ]
}
EOF
RUST_LOG=${RUST_LOG:-info} "$blkd" --plan "$plan" >"$run/blkd.log" 2>&1 &
blkd_pid=$!
# control REQUEST_JSON: one request line on the control socket (retried until the daemon
# listens, 15 s at most); prints the answer line.
control() {
    python3 - "$control" "$1" <<'PY'
import socket, sys, time
path, request = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 15
while True:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        break
    except OSError as error:
        s.close()
        if time.monotonic() > deadline:
            sys.exit(f"no answer on {path}: {error}")
        time.sleep(0.1)
s.settimeout(10)
s.sendall(request.encode() + b"\n")
print(s.makefile().readline().strip())
PY
}
register='{"request":"register","disk":"bench","node":0}'
answer=$(control "$register") ||
    die "the daemon does not answer on $control; its log: $(tail -n 5 "$run/blkd.log")"
[[ $answer == *'"result":"done"'* ]] || die "register refused: $answer"
for _ in $(seq 100); do
    [[ -S $vhost_socket ]] && break
    sleep 0.1
done
[[ -S $vhost_socket ]] || die "ivha-blkd never listened on $vhost_socket; its log: $(tail -n 5 "$run/blkd.log")"

# --- Rounds ---------------------------------------------------------------------------------------
qemu_args=(-accel "$accel" -nodefaults -display none -no-reboot -smp 1
    -object "memory-backend-memfd,id=ram,size=${guest_mem}M,share=on"
    -machine "q35,memory-backend=ram" -m "${guest_mem}M"
    -chardev "socket,id=c0,path=$vhost_socket,reconnect=1"
    -device "vhost-user-blk-pci,chardev=c0,num-queues=1"
    -drive "file=$qemu_img,format=raw,if=none,id=d1,cache=writeback"
    -device "virtio-blk-pci,drive=d1,num-queues=1,serial=$qemu_serial"
    -kernel "$kernel" -initrd "$initrd")
# Boot, fio's start-up (8 times) and the jobs, with room to spare.
limit=$((180 + 8 * (runtime + 15)))

echo "ivha storage benchmark: fio ${fio_version#fio-} in the guest, 4 KiB random I/O, libaio, O_DIRECT,"
echo "${runtime} s per job (+1 s ramp), median of $rounds rounds; blkd = ivha-blkd over vhost-user-blk,"
echo "qemu = QEMU's virtio-blk, cache=writeback, on a copy of the same $size_mib MiB image"
echo "  machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $accel$([[ $accel == tcg ]] && echo ' (no KVM)')"
echo "  $qemu_version; guest: 1 vCPU, $guest_mem MiB, kernel $(sed -n 's/^IVHA_GUEST_KERNEL_RELEASE=//p' "$guest/image.env" 2>/dev/null || true)"
echo "  images in $run ($(stat -f -c %T "$run"))"
echo "reproduce:"
echo "  ROUNDS=$rounds RUNTIME=$runtime scripts/bench-storage.sh"
echo "  daemon: $blkd --plan PLAN   (one disk 'bench', node 0; then $register on its control socket)"
echo "  guest:  $qemu ${qemu_args[*]} -append 'console=ttyS0 panic=-1 loglevel=1 ivha_bench.runtime=$runtime ivha_bench.order=blkd,qemu' -serial file:CONSOLE"
echo "  in it:  fio --name=bench --filename=/dev/vdX --rw=RW --iodepth=DEPTH --runtime=$runtime $fio_args"
echo

declare -A samples=()
for round in $(seq 1 "$rounds"); do
    if ((round % 2)); then order=blkd,qemu; else order=qemu,blkd; fi
    console=$run/console.$round.log
    say "round $round/$rounds ($order)"
    "$qemu" "${qemu_args[@]}" \
        -append "console=ttyS0 panic=-1 loglevel=1 ivha_bench.runtime=$runtime ivha_bench.order=$order" \
        -serial "file:$console" </dev/null >"$run/qemu.$round.log" 2>&1 &
    qemu_pid=$!
    deadline=$((SECONDS + limit))
    while kill -0 "$qemu_pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 1
    done
    if kill -0 "$qemu_pid" 2>/dev/null; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
        qemu_pid=""
        die "round $round: the guest did not power off within $limit s; console: $(tail -n 20 "$console")"
    fi
    qemu_status=0
    wait "$qemu_pid" || qemu_status=$?
    qemu_pid=""
    tr -d '\r' <"$console" >"$console.txt"
    failure=""
    ((qemu_status == 0)) || failure="QEMU exited with status $qemu_status ($(tail -n 3 "$run/qemu.$round.log"))"
    grep -q '^BENCH error' "$console.txt" && failure="the guest reported errors"
    grep -q '^BENCH done' "$console.txt" || failure="${failure:-the guest did not finish}"
    if [[ -n $failure ]]; then
        {
            echo "bench-storage: error: round $round: $failure"
            echo "--- guest console (BENCH lines and the last lines):"
            grep '^BENCH' "$console.txt" || true
            tail -n 15 "$console.txt"
            echo "--- ivha-blkd log (last lines):"
            tail -n 15 "$run/blkd.log"
        } >&2
        exit 1
    fi
    grep '^BENCH disks' "$console.txt" | sed "s/^BENCH /  round $round: /" >&2
    while read -r _ _ kind rw depth iops; do
        samples[$kind.$rw.$depth]+="$iops "
    done < <(grep '^BENCH result' "$console.txt")
done

declare -A iops=()
for rw in randwrite randread; do
    for depth in 1 16; do
        for kind in blkd qemu; do
            [[ -n ${samples[$kind.$rw.$depth]:-} ]] || die "no result for $kind $rw qd$depth"
            # shellcheck disable=SC2086 # word splitting wanted
            iops[$kind.$rw.$depth]=$(median ${samples[$kind.$rw.$depth]})
            echo "  $rw qd$depth $kind: ${samples[$kind.$rw.$depth]}" >&2
        done
    done
done
echo >&2

printf '%-14s %10s %10s   %-10s\n' "workload" "blkd" "qemu" "blkd/qemu"
for rw in randwrite randread; do
    for depth in 1 16; do
        b=${iops[blkd.$rw.$depth]}
        q=${iops[qemu.$rw.$depth]}
        printf '%-14s %10s %10s   %-10s\n' "$rw qd$depth" "$b" "$q" "$(ratio "$b" "$q")"
    done
done
echo
echo "IOPS (higher is better), measured by fio in the guest. Both disks are write-back caches the"
echo "guest can flush (fio issues no flush here); blkd processes each queue's requests one at a time."
