#!/usr/bin/env bash
# End-to-end smoke test of VM sandboxes on this machine's VM backend (QEMU/TCG
# here): stage the runtime if missing, build everything from the workspace,
# start a fresh gateway with only the vm driver, create / list / exec /
# delete a sandbox, stop the gateway. On failure the state dir is kept and
# the gateway log and every console log are printed.
set -euo pipefail

# --secure: the gateway's defaults (TLS and a token); the CLI finds it
# through the client config the gateway writes. Default: the plaintext,
# no-auth development mode the incumbent's e2e uses.
SECURE=0
[[ "${1:-}" == "--secure" ]] && SECURE=1

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RT=${OPENSHELL_VM_RUNTIME:-$ROOT/runtime}
BIN=$CARGO_TARGET_DIR/debug
say() { echo "e2e-vm: $*"; }

[[ -f "$RT/backend" && -f "$RT/kernel/vmlinux" ]] || scripts/vm-setup.sh
say "backend: $(grep '^backend=' "$RT/backend")"

say "building the gateway, CLI, supervisor (musl) and the vm driver"
cargo build -q -p openshell-cli
cargo build -q -p openshell-supervisor --target x86_64-unknown-linux-musl
scripts/vm-rootfs.sh "$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/debug/openshell-supervisor"
cargo build -q --release --target wasm32-wasip2 --manifest-path drivers/Cargo.toml -p openshell-driver-vm

# Short paths: AF_UNIX socket paths are limited to 108 bytes.
STATE=$(mktemp -d /tmp/osvm.XXXXXX)
DRIVERS=$STATE/drivers
mkdir -p "$DRIVERS"
cp "$CARGO_TARGET_DIR/wasm32-wasip2/release/openshell_driver_vm.wasm" "$DRIVERS/"
LOG=$STATE/gateway.log
GW_PID=""

on_exit() {
    local rc=$?
    if [[ -n "$GW_PID" ]] && kill -0 "$GW_PID" 2>/dev/null; then
        kill -TERM "$GW_PID" 2>/dev/null || true
        wait "$GW_PID" 2>/dev/null || true
    fi
    if [[ $rc -ne 0 ]]; then
        say "FAILED (exit $rc); state kept in $STATE"
        echo "----- gateway log -----"; cat "$LOG" || true
        for f in "$STATE"/sandboxes/*/console.log "$STATE"/sandboxes/*/qemu.log "$STATE"/sandboxes/*/gvproxy.log; do
            [[ -f "$f" ]] && { echo "----- $f -----"; cat "$f"; }
        done
    else
        rm -rf "$STATE"
    fi
    exit $rc
}
trap on_exit EXIT

t0=$(date +%s.%N)
INSECURE=(--disable-tls --disable-gateway-auth)
export OPENSHELL_CONFIG=$STATE/config.json
((SECURE)) && INSECURE=()
OPENSHELL_VM_RUNTIME=$RT "$BIN/openshell" gateway start --drivers vm "${INSECURE[@]}" \
    --db-url sqlite::memory: --port 0 --state-dir "$STATE" --driver-dir "$DRIVERS" >"$LOG" 2>&1 &
GW_PID=$!
for _ in $(seq 1 300); do
    grep -q "Server listening" "$LOG" 2>/dev/null && break
    kill -0 "$GW_PID" 2>/dev/null || { say "the gateway exited"; exit 1; }
    sleep 0.05
done
ADDR=$(sed -n 's/.*Server listening on \([0-9.:]*\).*/\1/p' "$LOG" | head -1)
[[ -n "$ADDR" ]] || { say "the gateway never said Server listening"; exit 1; }
if ((SECURE)); then
    grep -q '"token"' "$OPENSHELL_CONFIG" || { say "no client config with a token"; exit 1; }
    say "TLS and auth on; the CLI uses $OPENSHELL_CONFIG"
else
    export OPENSHELL_GATEWAY_ENDPOINT=http://$ADDR
fi
os() { "$BIN/openshell" "$@"; }
say "gateway on $ADDR"

os status | tee "$STATE/status.out"
grep -q Connected "$STATE/status.out"

NAME=vm-e2e
t1=$(date +%s.%N)
out=$(os sandbox create --name "$NAME" -- echo hi)
echo "$out"
grep -qx hi <<<"$out"
say "create -> hi in $(echo "$(date +%s.%N) - $t1" | bc) s"

os sandbox list --names | tee "$STATE/list.out"
grep -qx "$NAME" "$STATE/list.out"

kernel=$(os sandbox exec "$NAME" -- uname -a)
echo "$kernel"
[[ "$kernel" == *"$(cat "$RT/kernel/release")"* ]] || { say "uname does not show the guest kernel"; exit 1; }

os sandbox delete "$NAME"
! os sandbox list --names | grep -qx "$NAME"

kill -TERM "$GW_PID"
wait "$GW_PID"
GW_PID=""
say "PASS: gateway start to teardown in $(echo "$(date +%s.%N) - $t0" | bc) s"
