#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test openshell.
# Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
# openssh-client and openssh-sftp-server: the SSH tests run ssh and scp, and
# sandboxes see the host's /usr, so the host's sftp-server is theirs.
# btrfs-progs: mkfs.btrfs makes the sandbox disk (per-sandbox quotas).
# attr: tests mark overlayfs opaque directories with setfattr.
# docker-registry: the image store's pull tests run a real registry on loopback.
# mmdebstrap and umoci: scripts/image-base.sh builds the base image with them.
for pkg in protobuf-compiler postgresql curl python3 musl-tools tmux python3-venv openssh-client openssh-sftp-server btrfs-progs attr docker-registry mmdebstrap umoci; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The docker-registry package also runs a system registry, on every interface
# (`addr: :5000`). Nothing here uses it (the tests start their own on a free
# loopback port), so bind it to loopback and restart it if it is running,
# under systemd or the package's init script.
registry_config=/etc/docker/registry/config.yml
if [ -f "$registry_config" ] && grep -qE '^\s*addr: *(0\.0\.0\.0|\[::\])?:[0-9]+\s*$' "$registry_config"; then
  echo "setup: binding the system docker-registry to 127.0.0.1 ($registry_config)"
  $sudo_ sed -i -E 's/^(\s*addr: *)(0\.0\.0\.0|\[::\])?:([0-9]+)\s*$/\1127.0.0.1:\3/' "$registry_config"
  if [ -d /run/systemd/system ]; then
    $sudo_ systemctl try-restart docker-registry.service
  elif $sudo_ /etc/init.d/docker-registry status >/dev/null 2>&1; then
    $sudo_ /etc/init.d/docker-registry restart >/dev/null
  fi
fi

# The toolchain and targets pinned in rust-toolchain.toml.
rustup show active-toolchain >/dev/null 2>&1 || rustup toolchain install
rustup target add wasm32-wasip2 x86_64-unknown-linux-musl >/dev/null

if ! command -v just >/dev/null 2>&1; then
  echo "setup: installing just (PyPI rust-just)"
  python3 -m pip install -q rust-just
fi

# Lint tools from crates.io, built into a directory outside the clone so CI
# runs reuse them, and rebuilt only when missing or at another version. Built
# in a throwaway target dir, not the project's (cargo install cleans it up).
# Cold: cargo-deny ~5 min, cargo-machete ~3 min on 2 cores; warm: nothing.
tools="${OPENSHELL_TOOLS:-/var/tmp/openshell-tools}"
install_tool() { # crate version
  local crate=$1 version=$2
  [ "$("$tools/bin/$crate" --version 2>/dev/null | awk '{print $NF}')" = "$version" ] && return
  echo "setup: installing $crate $version into $tools (a few minutes, once)"
  env -u CARGO_TARGET_DIR cargo install -q --locked --root "$tools" --version "=$version" "$crate"
}
install_tool cargo-deny 0.20.2
install_tool cargo-machete 0.9.2

# A private Python environment for the generic gRPC client test.
venv=".venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import grpc_tools' 2>/dev/null; then
  echo "setup: creating $venv with grpcio-tools"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q grpcio grpcio-tools grpcio-reflection
fi
echo "setup: done"
