#!/usr/bin/env bash
# Stages the VM runtime into a project-owned directory (default ./runtime),
# then probes which VM backend can boot a guest here and caches the verdict.
#
#   runtime/bin/gvproxy            gvproxy 0.8.1 from trixie (dpkg -x, not installed)
#   runtime/libkrunfw/             libkrunfw.so.5 from sid (for the libkrun backend)
#   runtime/kernel/vmlinux         bookworm cloud kernel, uncompressed (QEMU boots it via PVH)
#   runtime/kernel/modules/*.ko    the virtio modules (net, console, blk) and overlay the guest's /init loads
#   runtime/bin/busybox            busybox-static (guest userland, probe guest)
#   runtime/backend                the cached backend verdict (delete it, or pass --reprobe)
#
# QEMU (bookworm's qemu-system-x86) is the one system-wide package. Newer
# suites are only ever read through a private apt configuration under
# runtime/apt: nothing from trixie or sid touches the system.
#
# Idempotent: every step is skipped when its output exists.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RT=${OPENSHELL_VM_RUNTIME:-$ROOT/runtime}
REPROBE=0
[[ "${1:-}" == "--reprobe" ]] && REPROBE=1

# Versions tested on these machines.
KERNEL_PKG=linux-image-6.1.0-57-cloud-amd64
GVPROXY_VERSION=0.8.1-3
LIBKRUNFW_VERSION=5.5.0+ds-1
# virtio_console: the identity channel (a virtio-serial port) the guest's
# init reads its launch secret and environment from.
MODULES=(virtio_ring virtio virtio_mmio failover net_failover virtio_net virtio_console virtio_blk overlay)

say() { echo "vm-setup: $*"; }
mkdir -p "$RT"/{debs,bin,kernel/modules}

# --- QEMU (bookworm, system-wide) -------------------------------------------
if ! command -v qemu-system-x86_64 >/dev/null; then
    say "installing qemu-system-x86 (bookworm)"
    sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_=sudo
    $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86
fi
say "$(qemu-system-x86_64 --version | head -1)"

# --- private apt for single packages from trixie / sid ------------------------
# $1 = suite; prints the apt options that read only that suite.
apt_opts() {
    local suite=$1 dir="$RT/apt/$1"
    if [[ ! -f "$dir/sources.list" ]]; then
        mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" >"$dir/sources.list"
    fi
    echo "-o Dir::Etc::sourcelist=$dir/sources.list -o Dir::Etc::sourceparts=/dev/null" \
        "-o Dir::State::Lists=$dir/lists -o Dir::Cache=$dir/cache"
}
# $1 = suite ('' = the system's), $2 = package, $3 = version ('' = candidate)
fetch_deb() {
    local suite=$1 pkg=$2 ver=$3 opts=""
    if ls "$RT/debs/${pkg}_"*.deb >/dev/null 2>&1; then return; fi
    if [[ -n "$suite" ]]; then
        opts=$(apt_opts "$suite")
        if [[ ! -f "$RT/apt/$suite/updated" ]]; then
            say "reading the $suite package index (private, under runtime/apt)"
            # shellcheck disable=SC2086
            apt-get $opts update -qq && touch "$RT/apt/$suite/updated"
        fi
    fi
    say "downloading $pkg${ver:+=$ver}${suite:+ from $suite}"
    # shellcheck disable=SC2086
    (cd "$RT/debs" && apt-get $opts download -qq "$pkg${ver:+=$ver}")
}

# --- gvproxy (trixie) ----------------------------------------------------------
if [[ ! -x "$RT/bin/gvproxy" ]]; then
    fetch_deb trixie gvproxy "$GVPROXY_VERSION"
    dpkg -x "$RT"/debs/gvproxy_*.deb "$RT/gvproxy"
    ln -sf "$(find "$RT/gvproxy" -type f -name gvproxy | head -1)" "$RT/bin/gvproxy"
fi
say "gvproxy: $("$RT/bin/gvproxy" -version 2>&1 | head -1)"

# --- libkrunfw (sid), for the libkrun backend on real KVM hosts ---------------
if ! ls "$RT"/libkrunfw/libkrunfw.so.5* >/dev/null 2>&1; then
    fetch_deb sid libkrunfw5 "$LIBKRUNFW_VERSION"
    dpkg -x "$RT"/debs/libkrunfw5_*.deb "$RT/libkrunfw.x"
    mkdir -p "$RT/libkrunfw"
    find "$RT/libkrunfw.x" -name 'libkrunfw.so.5*' -exec cp -a {} "$RT/libkrunfw/" \;
    rm -rf "$RT/libkrunfw.x"
fi
say "libkrunfw: $(ls "$RT/libkrunfw" | tr '\n' ' ')"

# --- busybox (bookworm) --------------------------------------------------------
if [[ ! -x "$RT/bin/busybox" ]]; then
    fetch_deb "" busybox-static ""
    dpkg -x "$RT"/debs/busybox-static_*.deb "$RT/busybox.x"
    cp "$RT/busybox.x/bin/busybox" "$RT/bin/busybox"
    rm -rf "$RT/busybox.x"
fi

# --- guest kernel (bookworm cloud) ---------------------------------------------
missing_module=""
for m in "${MODULES[@]}"; do
    [[ -f "$RT/kernel/modules/$m.ko" ]] || missing_module=$m
done
if [[ ! -f "$RT/kernel/vmlinux" || -n "$missing_module" ]]; then
    fetch_deb "" "$KERNEL_PKG" ""
    rm -rf "$RT/kernel.x"
    dpkg -x "$RT/debs/${KERNEL_PKG}_"*.deb "$RT/kernel.x"
    cp "$RT"/kernel.x/boot/vmlinuz-* "$RT/kernel/vmlinuz"
    for m in "${MODULES[@]}"; do
        f=$(find "$RT/kernel.x/lib/modules" -name "$m.ko*" | head -1)
        [[ -n "$f" ]] || { echo "vm-setup: module $m missing from $KERNEL_PKG" >&2; exit 1; }
        case "$f" in
            *.xz) xz -dc "$f" >"$RT/kernel/modules/$m.ko" ;;
            *.zst) zstd -dqc "$f" >"$RT/kernel/modules/$m.ko" ;;
            *) cp "$f" "$RT/kernel/modules/$m.ko" ;;
        esac
    done
    basename "$(ls -d "$RT"/kernel.x/lib/modules/*)" >"$RT/kernel/release"
    # The bzImage's payload, uncompressed: QEMU boots an ELF vmlinux via PVH
    # and skips the in-guest decompression (~0.25 s under TCG).
    # The payload's offset and length are in the bzImage header (boot
    # protocol 2.08+); Debian's cloud kernel compresses it with LZ4.
    python3 - "$RT/kernel/vmlinuz" "$RT/kernel/payload" <<'EOF'
import struct, sys
d = open(sys.argv[1], "rb").read()
setup = ((d[0x1f1] or 4) + 1) * 512
off, length = struct.unpack_from("<II", d, 0x248)
open(sys.argv[2], "wb").write(d[setup + off : setup + off + length])
EOF
    magic=$(head -c 4 "$RT/kernel/payload" | od -An -tx1 | tr -d ' ')
    case "$magic" in
        02214c18) lz4 -dc "$RT/kernel/payload" >"$RT/kernel/vmlinux.tmp" 2>/dev/null || true ;;
        fd377a58) xz -dc "$RT/kernel/payload" >"$RT/kernel/vmlinux.tmp" 2>/dev/null || true ;;
        28b52ffd) zstd -dqc "$RT/kernel/payload" >"$RT/kernel/vmlinux.tmp" 2>/dev/null || true ;;
        1f8b*) gzip -dc "$RT/kernel/payload" >"$RT/kernel/vmlinux.tmp" 2>/dev/null || true ;;
    esac
    rm -f "$RT/kernel/payload"
    [[ "$(head -c 4 "$RT/kernel/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]] ||
        { echo "vm-setup: no ELF vmlinux in the bzImage (payload magic $magic)" >&2; exit 1; }
    mv "$RT/kernel/vmlinux.tmp" "$RT/kernel/vmlinux"
    rm -rf "$RT/kernel.x"
fi
say "kernel: $(cat "$RT/kernel/release") ($(du -h "$RT/kernel/vmlinux" | cut -f1) vmlinux)"

# --- backend probe ---------------------------------------------------------------
# Boots a tiny guest (busybox /init that prints a marker) with a short
# timeout per backend. Opening /dev/kvm proves nothing: on these machines it
# is kvm_pvm, where a real guest dies with KVM_EXIT_INTERNAL_ERROR after ~12 s.
probe_guest() {
    local d="$RT/probe"
    [[ -f "$d/probe.cpio" ]] && return
    rm -rf "$d" && mkdir -p "$d/root/bin"
    cp "$RT/bin/busybox" "$d/root/bin/busybox"
    mkdir -p "$d/root/dev"
    # No /dev/console in the archive (that would need mknod): mount devtmpfs
    # and point stdout at the console ourselves.
    printf '#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\nexec >/dev/console 2>&1\n/bin/busybox echo OPENSHELL-PROBE-OK\n/bin/busybox reboot -f\n' >"$d/root/init"
    chmod +x "$d/root/init"
    (cd "$d/root" && find . | "$RT/bin/busybox" cpio -o -H newc -R 0:0 >"$d/probe.cpio" 2>/dev/null)
}
# Under TCG the guest's TSC runs at the host's rate. On a busy host the
# guest's PIT calibration fails and the kernel then hangs, so the host tells
# the guest the rate (the gateway does the same, see host/vm qemu.rs).
tsc_khz() { awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo; }
# $1 = accel (tcg|kvm), $2 = seconds; prints the boot time on success.
probe_qemu() {
    local accel=$1 secs=$2 log="$RT/probe/$1.log" cpu=max start
    [[ $accel == kvm ]] && cpu=host
    rm -f "$log"
    start=$(date +%s.%N)
    timeout -s KILL "$secs" qemu-system-x86_64 -M microvm,x-option-roms=off -accel "$accel" -cpu "$cpu" \
        -m 128 -smp 1 -nodefaults -no-user-config -display none -no-reboot \
        -chardev file,id=con0,path="$log" -serial chardev:con0 \
        -kernel "$RT/kernel/vmlinux" -initrd "$RT/probe/probe.cpio" \
        -append "console=ttyS0 panic=-1 reboot=t tsc_early_khz=$(tsc_khz)" >"$RT/probe/$accel.qemu.log" 2>&1 || true
    if grep -q OPENSHELL-PROBE-OK "$log" 2>/dev/null; then
        printf '%.2fs' "$(echo "$(date +%s.%N) - $start" | bc)"
    else
        return 1
    fi
}
if [[ $REPROBE == 1 || ! -f "$RT/backend" ]]; then
    probe_guest
    kvm_note="no /dev/kvm"
    if [[ -e /dev/kvm ]]; then
        kvm_note="/dev/kvm present"
        [[ -d /sys/module/kvm_pvm ]] && kvm_note="/dev/kvm is kvm_pvm (a software nested hypervisor)"
    fi
    say "probing qemu-kvm (5 s max; $kvm_note)"
    if [[ -e /dev/kvm ]] && t=$(probe_qemu kvm 5); then
        kvm="ok: probe guest booted in $t"
        backend=qemu-kvm
        # libkrun needs exactly what qemu-kvm just proved; its launcher must
        # be built and libkrunfw staged for it to be picked.
        krun="bootable KVM; select it with --vm-backend krun"
    else
        kvm="unbootable: the probe guest printed nothing within 5 s ($kvm_note; guests die with KVM_EXIT_INTERNAL_ERROR here)"
        krun="not selected: libkrun needs a KVM guest to boot, and the KVM probe guest did not ($kvm_note)"
        backend=""
    fi
    say "probing qemu-tcg (10 s max)"
    if t=$(probe_qemu tcg 10); then
        tcg="ok: probe guest booted in $t"
        backend=${backend:-qemu-tcg}
    else
        tcg="unbootable: the probe guest printed nothing within 10 s (see $RT/probe/tcg.log)"
    fi
    {
        echo "backend=${backend:-none}"
        echo "qemu-kvm=$kvm"
        echo "qemu-tcg=$tcg"
        echo "krun=$krun"
        echo "probed-at=$(date -u +%FT%TZ)"
    } >"$RT/backend"
fi
sed 's/^/vm-setup: probe: /' "$RT/backend"
