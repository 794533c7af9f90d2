#!/usr/bin/env bash
# Builds the ivha guest image and the client VM's image:
#   TARGET/guest/vmlinuz                   the Debian cloud kernel (linux-image-*-cloud-amd64)
#   TARGET/guest/initramfs.cpio.gz         busybox (static), the static guest-agent, /init, modules
#   TARGET/guest/client-initramfs.cpio.gz  busybox (static), the static ivha-client-load, the
#                                          client's /init (scripts/client/init), modules
#   TARGET/guest/image.env                 what went in (kernel package, release, module load
#                                          orders, paths)
# where TARGET is cargo's target directory: $CARGO_TARGET_DIR, default target/.
#
# Idempotent and incremental: missing Debian packages are installed (only when missing), the
# kernel .deb is downloaded once into TARGET/guest/cache/, the kernel is unpacked only when the
# .deb changes, and an initramfs is rebuilt only when one of its inputs changed.
# In a terminal (stderr) a status line shows the step and an estimate of the time left, from
# the step times of the last run; otherwise only plain lines. See docs/guest-image.md.
#
# Environment:
#   IVHA_KERNEL_DEB=FILE   use this kernel .deb instead of resolving linux-image-cloud-amd64
#   IVHA_FORCE=1           rebuild the initramfs even when its inputs did not change
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib/target.sh

out=$target_dir/guest
cache=$out/cache
target_triple=x86_64-unknown-linux-gnu
agent=$target_dir/$target_triple/guest-agent/guest-agent
client_load=$target_dir/$target_triple/guest-agent/ivha-client-load
meta_package=linux-image-cloud-amd64
# Modules each image needs; their dependencies are added from modules.dep. The client needs
# no filesystem module: ext4, jbd2, crc16 and crc32c are built into the cloud kernel
# (CONFIG_EXT4_FS=y); a module that is built in is skipped with a note.
# virtio_console: the virtio-serial port to the coordinator (takeovers while hostd is away).
guest_modules=(virtio_pci virtio_net virtio_blk virtio_rng virtio_console pvpanic_mmio pvpanic_pci)
client_modules=(virtio_pci virtio_blk)
# Debian packages this script needs (command → package).
declare -A needed_tools=([busybox]=busybox-static [cpio]=cpio [depmod]=kmod [gzip]=gzip [dpkg-deb]=dpkg)

started=$(date +%s.%N)
mkdir -p "$cache"

# --- Progress ---------------------------------------------------------------------------------
# In a terminal: one status line on stderr, "[N/M] step, about S s left", the estimate being
# the sum of this and the later steps' times in the last run (cache/step-times). Otherwise
# nothing beyond the plain `say` lines.
steps=("host tools" "kernel package" "kernel and modules" "static binaries (cargo)"
    "guest initramfs" "client initramfs")
step_times_file=$cache/step-times
last_times=()
[[ -f $step_times_file ]] && mapfile -t last_times <"$step_times_file"
this_times=()
step_number=0
step_started=$started
status_line=""
progress_tty=0
[[ -t 2 ]] && progress_tty=1
clear_status() { ((progress_tty)) && [[ -n $status_line ]] && printf '\r\033[K' >&2; return 0; }
draw_status() { ((progress_tty)) && [[ -n $status_line ]] && printf '%s' "$status_line" >&2; return 0; }
seconds_since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
# step: the next step begins (the previous one is timed).
step() {
    local left="" i
    if ((step_number > 0)); then
        this_times[step_number - 1]=$(seconds_since "$step_started")
    fi
    step_number=$((step_number + 1))
    step_started=$(date +%s.%N)
    ((progress_tty)) || return 0
    for ((i = step_number - 1; i < ${#steps[@]}; i++)); do
        if [[ -z ${last_times[i]:-} ]]; then
            left="time left unknown (no earlier run)"
            break
        fi
        left=$(awk -v a="${left:-0}" -v b="${last_times[i]}" 'BEGIN { print a + b }')
    done
    [[ $left == time* ]] || left="about $(awk -v s="$left" 'BEGIN { printf "%.0f", s + 0.5 }') s left"
    clear_status
    status_line="build-guest-image: [$step_number/${#steps[@]}] ${steps[step_number - 1]}, $left"
    draw_status
}
# steps_done: times the last step, keeps every step's time for the next run's estimate.
steps_done() {
    this_times[step_number - 1]=$(seconds_since "$step_started")
    printf '%s\n' "${this_times[@]}" >"$step_times_file.tmp" && mv "$step_times_file.tmp" "$step_times_file"
    clear_status
    status_line=""
}
say() {
    clear_status
    echo "build-guest-image: $*"
    draw_status
}
die() {
    clear_status
    echo "build-guest-image: error: $*" >&2
    exit 1
}
trap 'clear_status; echo "build-guest-image: error: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR
. scripts/lib/apt.sh

# An ELF file is statically linked when it has no PT_INTERP program header.
is_static() {
    local f=$1 phoff phentsize phnum i type
    [[ $(od -An -c -N4 "$f" | tr -d ' ') == '177ELF' ]] || return 1
    phoff=$(od -An -tu8 -j32 -N8 "$f" | tr -d ' ')
    phentsize=$(od -An -tu2 -j54 -N2 "$f" | tr -d ' ')
    phnum=$(od -An -tu2 -j56 -N2 "$f" | tr -d ' ')
    for ((i = 0; i < phnum; i++)); do
        type=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$f" | tr -d ' ')
        [[ $type == 3 ]] && return 1
    done
    return 0
}

# --- 1. Host tools ----------------------------------------------------------------------------
step
# busybox must be the static build: it is copied into the image as is.
missing=()
for tool in "${!needed_tools[@]}"; do
    pkg=${needed_tools[$tool]}
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    apt_update_once
    say "installing: ${missing[*]}"
    if ! apt_out=$(as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" 2>&1); then
        echo "$apt_out" >&2
        die "cannot install ${missing[*]}"
    fi
fi
busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox missing although busybox-static is installed"
"$busybox" --list >/dev/null || die "$busybox does not run"
is_static "$busybox" || die "$busybox is dynamically linked: install busybox-static, not busybox"
depmod=$(command -v depmod || echo /sbin/depmod)
[[ -x $depmod ]] || die "depmod not found although kmod is installed"

# --- 2. Kernel package ------------------------------------------------------------------------
step
# Resolve the current linux-image-<release>-cloud-amd64 behind the meta package, download it once
# (verified against the archive's SHA256), fall back to the newest cached .deb when offline.
# Prints "PACKAGE VERSION" of the kernel the meta package currently depends on.
resolve_kernel_package() {
    apt-cache show --no-all-versions "$meta_package" 2>/dev/null |
        awk '$1 == "Depends:" {
            for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-.*-cloud-amd64$/) {
                v = $(i + 2); sub(/\)?,?$/, "", v); print $i, v; exit
            }
        }'
}
if [[ -n ${IVHA_KERNEL_DEB:-} ]]; then
    [[ -f $IVHA_KERNEL_DEB ]] || die "IVHA_KERNEL_DEB=$IVHA_KERNEL_DEB does not exist"
    deb=$IVHA_KERNEL_DEB
    say "kernel package: $deb (IVHA_KERNEL_DEB)"
else
    resolved=$(resolve_kernel_package || true)
    if [[ -z $resolved ]]; then
        apt_update_once
        resolved=$(resolve_kernel_package || true)
    fi
    if [[ -n $resolved ]]; then
        read -r kpkg kpkg_version <<<"$resolved"
        deb=$cache/${kpkg}_${kpkg_version//:/%3a}_amd64.deb
        # A cached .deb was verified when it was downloaded; dpkg-deb still has to accept it.
        if [[ -f $deb ]] && dpkg-deb --field "$deb" Package >/dev/null 2>&1; then
            say "kernel package: $kpkg $kpkg_version (cached: $deb)"
        else
            say "kernel package: $kpkg $kpkg_version: downloading into $cache/"
            info=$(apt-cache show "$kpkg=$kpkg_version")
            kpkg_sha=$(awk '/^SHA256:/ { print $2; exit }' <<<"$info")
            rm -f "$deb" "$cache/$(basename "$(awk '/^Filename:/ { print $2; exit }' <<<"$info")")"
            sandbox=()
            [[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
            (cd "$cache" && apt-get download -qq "${sandbox[@]}" "$kpkg=$kpkg_version") ||
                die "apt-get download $kpkg=$kpkg_version failed"
            [[ -f $deb ]] || die "apt-get download did not produce $deb"
            [[ $(sha256sum "$deb" | cut -d' ' -f1) == "$kpkg_sha" ]] ||
                die "$deb does not match the archive's SHA256 $kpkg_sha"
        fi
    else
        # shellcheck disable=SC2012 # our own file names: no odd characters
        deb=$(ls -t "$cache"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n1 || true)
        [[ -n $deb ]] || die "cannot resolve $meta_package (no apt lists, no network?) and no cached kernel .deb in $cache/"
        say "warning: cannot resolve $meta_package; using the cached $deb"
    fi
fi
deb_name=$(dpkg-deb --field "$deb" Package) || die "$deb is not a Debian package"
deb_version=$(dpkg-deb --field "$deb" Version)
deb_sha=$(sha256sum "$deb" | cut -d' ' -f1)

# --- 3. Kernel and modules --------------------------------------------------------------------
# Unpack the .deb into a scratch tree, run depmod on it, resolve each image's modules and
# their dependencies in load order (load-order, client-load-order), keep only vmlinuz and those
# modules (decompressed) under cache/kernel/. Redone only when the .deb or a list changes.
step
kdir=$cache/kernel
kstamp_want="$deb_sha ${guest_modules[*]} client: ${client_modules[*]}"
if [[ -f $kdir/stamp ]] && [[ $(cat "$kdir/stamp") == "$kstamp_want" ]]; then
    say "kernel: unpacked already ($deb_name $deb_version)"
else
    say "kernel: unpacking $deb_name $deb_version"
    scratch=$cache/unpack
    rm -rf "$scratch" "$kdir"
    mkdir -p "$scratch" "$kdir/modules"
    dpkg-deb -x "$deb" "$scratch" || die "cannot unpack $deb"
    moddir=""
    for candidate in "$scratch"/lib/modules/* "$scratch"/usr/lib/modules/*; do
        [[ -d $candidate/kernel ]] && moddir=$candidate && break
    done
    [[ -n $moddir ]] || die "$deb has no lib/modules/<release>/kernel"
    release=$(basename "$moddir")
    vmlinuz_src=""
    for candidate in "$scratch/boot/vmlinuz-$release" "$scratch/usr/lib/linux-image-$release/vmlinuz"; do
        [[ -f $candidate ]] && vmlinuz_src=$candidate && break
    done
    [[ -n $vmlinuz_src ]] || die "$deb has no vmlinuz-$release"
    # depmod wants <base>/lib/modules/<release>.
    base=${moddir%/lib/modules/"$release"}
    "$depmod" -b "$base" "$release" || die "depmod failed on $moddir"

    # modules.dep: "kernel/x/a.ko[.xz]: kernel/y/b.ko kernel/z/c.ko"; names use "_" for "-".
    declare -A mod_path=() mod_deps=()
    while read -r name file deps; do
        mod_path[$name]=$file
        mod_deps[$name]=$deps
    done < <(awk -F': *' '
        function modname(f) { sub(/.*\//, "", f); sub(/\.ko.*/, "", f); gsub(/-/, "_", f); return f }
        {
            n = split($2, d, " "); deps = ""
            for (i = 1; i <= n; i++) deps = deps " " modname(d[i])
            print modname($1), $1, deps
        }' "$moddir/modules.dep")
    order=()
    declare -A visited=()
    visit() { # depth-first: dependencies before dependents
        local m=$1 d
        [[ -n ${visited[$m]:-} ]] && return 0
        visited[$m]=1
        [[ -n ${mod_path[$m]:-} ]] || die "module $m is not in $deb_name (not built or built in?)"
        for d in ${mod_deps[$m]}; do visit "$d"; done
        order+=("$m")
    }
    # load_order_of MODULE...: the load order of these modules and their dependencies.
    load_order_of() {
        local m
        order=()
        visited=()
        for m in "$@"; do
            if grep -q "/${m//_/[-_]}.ko" "$moddir/modules.builtin" 2>/dev/null; then
                say "kernel: $m is built in"
                continue
            fi
            visit "$m"
        done
    }
    load_order_of "${client_modules[@]}"
    client_order=("${order[@]}")
    load_order_of "${guest_modules[@]}"
    # Every module either image loads, each once.
    declare -A kept=()
    for m in "${order[@]}" "${client_order[@]}"; do
        [[ -n ${kept[$m]:-} ]] && continue
        kept[$m]=1
        src=$moddir/${mod_path[$m]}
        dst=$kdir/modules/$m.ko
        case $src in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unknown module format: $src" ;;
        esac
        [[ $src == *.ko ]] || say "kernel: decompressed ${src##*/}"
    done
    printf '%s\n' "${order[@]}" >"$kdir/load-order"
    printf '%s\n' "${client_order[@]}" >"$kdir/client-load-order"
    cp "$vmlinuz_src" "$kdir/vmlinuz"
    echo "$release" >"$kdir/release"
    rm -rf "$scratch"
    echo "$kstamp_want" >"$kdir/stamp"
    say "kernel: $release, modules in load order: ${order[*]}; client: ${client_order[*]}"
fi
release=$(cat "$kdir/release")
mapfile -t load_order <"$kdir/load-order"
mapfile -t client_load_order <"$kdir/client-load-order"

# --- 4. The guest agent and the client workload (static) -------------------------------------
# One cargo run for both: one wait for the shared target directory's lock.
step
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (see scripts/install-deps.sh)"
[[ -d $(rustc --print sysroot)/lib/rustlib/$target_triple/lib ]] ||
    die "the Rust standard library for $target_triple is not installed (rustup target add $target_triple)"
say "binaries: cargo build --profile guest-agent -p guest-agent -p client-load --target $target_triple (static)"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --quiet --profile guest-agent -p guest-agent -p client-load --target "$target_triple" ||
    die "building the guest agent and ivha-client-load failed"
for binary in "$agent" "$client_load"; do
    [[ -x $binary ]] || die "cargo did not produce $binary"
    is_static "$binary" || die "$binary is dynamically linked: the crt-static build did not take"
done

# --- 5. The initramfs images ------------------------------------------------------------------
# make_initramfs NAME OUTPUT OVERLAY LOAD_ORDER_FILE BINARY...: busybox with its applet links,
# each BINARY in /bin, the modules LOAD_ORDER_FILE names (and the file, as
# /lib/modules/RELEASE/load-order), then OVERLAY's files (OVERLAY/init is /init). Rebuilt only
# when an input's hash changed (OUTPUT.inputs beside it; IVHA_FORCE=1 rebuilds anyway).
make_initramfs() {
    local name=$1 output=$2 overlay=$3 order_file=$4
    shift 4
    local binaries=("$@") inputs stamp root binary mod
    local -a mods
    mapfile -t mods <"$order_file"
    [[ -f $overlay/init ]] || die "$overlay/init is missing"
    inputs=$(
        {
            echo "script $(sha256sum scripts/build-guest-image.sh | cut -d' ' -f1)"
            echo "kernel $deb_sha ${mods[*]}"
            for mod in "${mods[@]}"; do
                echo "$mod $(sha256sum "$kdir/modules/$mod.ko" | cut -d' ' -f1)"
            done
            echo "busybox $(sha256sum "$busybox" | cut -d' ' -f1)"
            for binary in "${binaries[@]}"; do
                echo "${binary##*/} $(sha256sum "$binary" | cut -d' ' -f1)"
            done
            (cd "$overlay" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
            (cd "$overlay" && find . -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n %a')
        } | sha256sum | cut -d' ' -f1
    )
    # The guest image's stamp keeps its old name, so that an unchanged image is not rebuilt.
    stamp=${output%.cpio.gz}.inputs
    if [[ -z ${IVHA_FORCE:-} && -f $output && -f $stamp && $(cat "$stamp") == "$inputs" ]]; then
        say "$name: up to date (inputs unchanged)"
        return 0
    fi
    say "$name: building"
    root=$out/rootfs-$name
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules/"$release"}
    chmod 1777 "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    # Applet links at build time, so nothing has to run before /init's first line.
    while IFS= read -r applet; do
        [[ $applet == */* ]] || continue # linuxrc: not wanted, /init is ours
        [[ -e $root/$applet || -L $root/$applet ]] && continue
        ln -s /bin/busybox "$root/$applet"
    done < <("$busybox" --list-full)
    for binary in "${binaries[@]}"; do
        cp "$binary" "$root/bin/"
    done
    for mod in "${mods[@]}"; do
        cp "$kdir/modules/$mod.ko" "$root/lib/modules/$release/"
    done
    printf '%s\n' "${mods[@]}" >"$root/lib/modules/$release/load-order"
    # The overlay (init, etc/...) goes in last and wins.
    cp -R "$overlay/." "$root/"
    chmod 0755 "$root/init"
    # The kernel's built-in initramfs already has /dev/console; add it anyway when we can.
    if [[ $(id -u) -eq 0 ]]; then
        mknod -m 600 "$root/dev/console" c 5 1
    fi
    # Reproducible: fixed mtimes, sorted names, device-independent inode numbers.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --quiet --null -o -H newc -R 0:0 --reproducible) | gzip -9n >"$output.tmp" ||
        die "creating the cpio archive $output failed"
    mv "$output.tmp" "$output"
    rm -rf "$root"
    echo "$inputs" >"$stamp"
}
initramfs=$out/initramfs.cpio.gz
client_initramfs=$out/client-initramfs.cpio.gz
vmlinuz=$out/vmlinuz
step
make_initramfs initramfs "$initramfs" scripts/guest "$kdir/load-order" "$agent"
step
make_initramfs client-initramfs "$client_initramfs" scripts/client "$kdir/client-load-order" "$client_load"
if ! cmp -s "$kdir/vmlinuz" "$vmlinuz"; then
    cp "$kdir/vmlinuz" "$vmlinuz"
    say "vmlinuz: updated ($release)"
fi

cat >"$out/image.env.tmp" <<EOF
# Written by scripts/build-guest-image.sh.
IVHA_GUEST_KERNEL=$vmlinuz
IVHA_GUEST_INITRAMFS=$initramfs
IVHA_GUEST_KERNEL_PACKAGE=$deb_name
IVHA_GUEST_KERNEL_PACKAGE_VERSION=$deb_version
IVHA_GUEST_KERNEL_RELEASE=$release
IVHA_GUEST_MODULES="${load_order[*]}"
IVHA_GUEST_BUSYBOX_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
IVHA_GUEST_INITRAMFS_SHA256=$(sha256sum "$initramfs" | cut -d' ' -f1)
IVHA_GUEST_CMDLINE_BASE="console=ttyS0 panic=-1"
IVHA_CLIENT_INITRAMFS=$client_initramfs
IVHA_CLIENT_MODULES="${client_load_order[*]}"
IVHA_CLIENT_INITRAMFS_SHA256=$(sha256sum "$client_initramfs" | cut -d' ' -f1)
EOF
mv "$out/image.env.tmp" "$out/image.env"
steps_done

mb() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f", b / 1048576 }'; }
total=$(($(stat -c %s "$vmlinuz") + $(stat -c %s "$initramfs")))
elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
say "sizes: vmlinuz $(mb "$vmlinuz") MB, initramfs $(mb "$initramfs") MB" \
    "(agent $(mb "$agent") MB, busybox $(mb "$busybox") MB, ${#load_order[@]} modules)," \
    "client-initramfs $(mb "$client_initramfs") MB (ivha-client-load $(mb "$client_load") MB," \
    "${#client_load_order[@]} modules); took ${elapsed} s"
echo "image: $vmlinuz $initramfs ($(awk -v b=$total 'BEGIN { printf "%.1f", b / 1048576 }') MB)"
echo "client image: $vmlinuz $client_initramfs"
