#!/usr/bin/env bash
# Builds the VM sandboxes' base initramfs: busybox, the virtio-net modules,
# the guest /init (supervisor/guest/init) and the static (musl) supervisor.
#
#   scripts/vm-rootfs.sh [SUPERVISOR]   -> runtime/rootfs/base.cpio
#
# Uncompressed on purpose: the kernel copies an uncompressed cpio, while
# inflating gzip under TCG (20-30x slower than the host) would add about a
# second to every boot. The host appends a small per-sandbox cpio (the
# environment file) to a copy of it at launch. Skips work when the output is
# newer than every input.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RT=${OPENSHELL_VM_RUNTIME:-$ROOT/runtime}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
SUPERVISOR=${1:-$TARGET/x86_64-unknown-linux-musl/debug/openshell-supervisor}
INIT=$ROOT/supervisor/guest/init
OUT=$RT/rootfs/base.cpio

[[ -x "$RT/bin/busybox" && -f "$RT/kernel/vmlinux" ]] || { echo "vm-rootfs: run 'just vm-setup' first" >&2; exit 1; }
[[ -x "$SUPERVISOR" ]] || { echo "vm-rootfs: no supervisor at $SUPERVISOR (cargo build -p openshell-supervisor --target x86_64-unknown-linux-musl)" >&2; exit 1; }
file "$SUPERVISOR" 2>/dev/null | grep -q 'static' || { echo "vm-rootfs: $SUPERVISOR is not statically linked" >&2; exit 1; }

if [[ -f "$OUT" && "$OUT" -nt "$SUPERVISOR" && "$OUT" -nt "$INIT" && "$OUT" -nt "$RT/bin/busybox" && "$OUT" -nt "$RT/kernel/modules" && "$OUT" -nt "$0" ]]; then
    echo "vm-rootfs: $OUT is up to date"
    exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# mktemp's 0700 would become the guest's / and lock sandbox code (uid 1000)
# out of everything.
chmod 0755 "$stage"
mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,run,sandbox,etc,lib/modules}
cp "$RT/bin/busybox" "$stage/bin/busybox"
for applet in $("$RT/bin/busybox" --list); do
    [[ -e "$stage/bin/$applet" ]] || ln -s busybox "$stage/bin/$applet"
done
cp "$RT"/kernel/modules/*.ko "$stage/lib/modules/"
install -m 0755 "$INIT" "$stage/init"
# Debug info is useless in the guest and the archive is copied per sandbox.
strip -o "$stage/bin/openshell-supervisor" "$SUPERVISOR"

mkdir -p "$RT/rootfs"
(cd "$stage" && find . | LC_ALL=C sort | "$RT/bin/busybox" cpio -o -H newc -R 0:0 >"$OUT.tmp" 2>/dev/null)
mv "$OUT.tmp" "$OUT"
echo "vm-rootfs: built $OUT ($(du -h "$OUT" | cut -f1))"
