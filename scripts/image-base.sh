#!/usr/bin/env bash
# Builds the base image sandboxes can be rooted in: Debian bookworm (minbase)
# with bash, Python 3 with pip and venv, git, curl, Node.js and npm, as an OCI
# image layout tagged `bookworm`.
#
#   scripts/image-base.sh [--force]   -> runtime/images/base (+ base.stamp)
#
# mmdebstrap writes the root filesystem as one tar (owners kept: it runs as
# root), umoci turns it into a one-layer image and sets its config. Rebuilt
# only when the stamp (this script, which holds the package list, and the
# tools' versions) changes; `--force` rebuilds anyway, to pick up Debian's
# updates. SOURCE_DATE_EPOCH fixes file times and the image's dates, so two
# builds from the same archive state give the same image digest.
#
# Pruned (dpkg path-exclude, kept in the image's /etc/dpkg/dpkg.cfg.d so later
# installs skip them too): /usr/share/doc except copyright files, man and info
# pages, translations. mmdebstrap drops apt's lists and caches. The host's
# /etc/resolv.conf and /etc/hostname it copies in are removed (the sandbox
# runtime owns those); /etc/hosts names localhost, which Debian leaves to the
# installer.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RT=${OPENSHELL_VM_RUNTIME:-$ROOT/runtime}
OUT=$RT/images/base
STAMP=$OUT.stamp
SUITE=bookworm
# python3-venv: Debian's pip refuses to install outside a venv (PEP 668), and
# `python3 -m venv` needs ensurepip, which is this package.
PACKAGES=(bash coreutils python3 python3-pip python3-venv git curl ca-certificates nodejs npm)
MIRROR=http://deb.debian.org
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1735689600} # 2025-01-01

for tool in mmdebstrap umoci; do
    command -v "$tool" >/dev/null || { echo "image-base: $tool is missing: run scripts/setup.sh" >&2; exit 1; }
done
# Root mode: the tar keeps the packages' owners without a user namespace.
[[ $(id -u) = 0 ]] || { echo "image-base: run as root (mmdebstrap keeps file owners only as root)" >&2; exit 1; }

stamp=$({ printf '%s\n' "$SUITE" "$SOURCE_DATE_EPOCH" "${PACKAGES[@]}"; cat "$0"; mmdebstrap --version; umoci --version; } | sha256sum | cut -d' ' -f1)
if [[ ${1:-} != --force && -f "$OUT/index.json" && "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]]; then
    echo "image-base: $OUT is up to date (inputs unchanged; --force rebuilds)"
    exit 0
fi

mkdir -p "$RT/images"
work=$(mktemp -d "$RT/images/.base.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar=$work/rootfs.tar
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

echo "image-base: mmdebstrap $SUITE (${PACKAGES[*]})"
mmdebstrap --quiet --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
    --customize-hook='printf "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" >"$1/etc/hosts"' \
    "$SUITE" "$tar" \
    "deb $MIRROR/debian $SUITE main" \
    "deb $MIRROR/debian $SUITE-updates main" \
    "deb $MIRROR/debian-security $SUITE-security main"
tar_size=$(du -h "$tar" | cut -f1)

echo "image-base: packing the OCI layout"
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:$SUITE"
umoci raw add-layer --image "$layout:$SUITE" --history.created "$created" \
    --history.created_by "mmdebstrap --variant=minbase $SUITE (scripts/image-base.sh)" "$tar"
umoci config --image "$layout:$SUITE" --created "$created" --no-history \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 \
    --config.workingdir /root \
    --config.cmd /bin/bash
umoci gc --layout "$layout"

rm -rf "$OUT" "$STAMP"
mv "$layout" "$OUT"
echo "$stamp" >"$STAMP"
echo "image-base: built $OUT:$SUITE in ${SECONDS}s (root filesystem tar $tar_size, layout $(du -sh "$OUT" | cut -f1))"
