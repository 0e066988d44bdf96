#!/usr/bin/env bash
# The VM runtime `just bench` uses: runtime-perf/ links to everything in
# runtime/ (`just vm-stage`) but the guest's base initramfs, which it builds
# around the release (perf) static supervisor, so the tests' runtime keeps
# its debug one.
#
#   scripts/perf-runtime.sh SUPERVISOR
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUPERVISOR=${1:?usage: perf-runtime.sh SUPERVISOR}
SRC=$ROOT/runtime
DST=$ROOT/runtime-perf
[[ -d "$SRC/bin" ]] || { echo "perf-runtime: run 'just vm-stage' first" >&2; exit 1; }
mkdir -p "$DST/rootfs"
for entry in "$SRC"/*; do
    name=$(basename "$entry")
    [[ "$name" == rootfs ]] && continue
    ln -sfn "$entry" "$DST/$name"
done
OPENSHELL_VM_RUNTIME=$DST "$ROOT/scripts/vm-rootfs.sh" "$SUPERVISOR"
