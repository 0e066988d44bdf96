#!/usr/bin/env bash
# Issue 18 item 5, end to end: the documented install (`just install`, here
# with --debug into a temp root and the shared target dir, to stay fast),
# then, in an empty directory with an empty HOME and no OPENSHELL_*
# settings, `openshell gateway start --drivers process` (no flag naming a
# path; --port 0 so a gateway already on 8080 does not matter: the client
# config it writes names the port) and `openshell sandbox create -- echo hi`,
# which must print hi. CI runs it in its fresh clone.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# Short: the default state dir is under HOME, and a sandbox's socket path
# (STATE/sandboxes/ID/run/gateway.sock) must fit in 107 bytes.
work=$(mktemp -d /tmp/osi.XXXXXX)
gw=""
cleanup() {
    if [[ -n $gw ]] && kill -0 "$gw" 2>/dev/null; then
        kill -TERM "$gw"
        wait "$gw" || true
    fi
    # A gateway that did not exit cleanly leaves its sandbox disk mounted.
    umount -l "$work/h/.local/state/openshell/sandboxes" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

(cd "$repo" && just install "$work/root" --debug)

mkdir -p "$work/h" "$work/cwd"
cd "$work/cwd"
run() {
    env -i PATH="$work/root/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME="$work/h" "$@"
}
# Not through `run`: a function put in the background is a subshell, and
# $! would be its pid, not the gateway's (which cleanup would then miss).
env -i PATH="$work/root/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME="$work/h" \
    openshell gateway start --drivers process --port 0 >"$work/gateway.out" 2>"$work/gateway.log" &
gw=$!
for _ in $(seq 600); do
    grep -q '^Server listening on ' "$work/gateway.out" && break
    kill -0 "$gw" 2>/dev/null || { cat "$work/gateway.log" >&2; echo "install-check: the gateway exited" >&2; exit 1; }
    sleep 0.1
done
grep -q '^Server listening on ' "$work/gateway.out" || { cat "$work/gateway.log" >&2; echo "install-check: the gateway never listened" >&2; exit 1; }

out=$(run timeout 120 openshell sandbox create -- echo hi) || { echo "$out"; cat "$work/gateway.log" >&2; exit 1; }
if ! grep -qx hi <<<"$out"; then
    echo "install-check: expected hi, got:" >&2
    echo "$out" >&2
    cat "$work/gateway.log" >&2
    exit 1
fi
run timeout 60 openshell sandbox delete --all >/dev/null
kill -TERM "$gw"
wait "$gw" || { echo "install-check: the gateway did not exit cleanly on SIGTERM" >&2; exit 1; }
gw=""
echo "install-check: ok: an installed openshell printed hi from a sandbox"
