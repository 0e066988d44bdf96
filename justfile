# Every task in one place. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

target := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() + "/target")
wasm_dir := target / "wasm32-wasip2/release"
export OPENSHELL_WASM_DIR := wasm_dir
# Lint tools built from crates.io by `just setup`, outside the clone so CI reuses them.
tools := env_var_or_default("OPENSHELL_TOOLS", "/var/tmp/openshell-tools")

# List the tasks.
default:
    @just --list

# Install what a fresh machine lacks (apt packages, rust targets, just, a Python venv).
setup:
    scripts/setup.sh

# Build the host workspace, the static supervisor (what image-rooted sandboxes
# and VM guests run) and the driver components.
build: drivers
    cargo build --workspace
    cargo build -p openshell-supervisor --target x86_64-unknown-linux-musl

# `openshell` has the bundled drivers built in; the launcher and the supervisors
# (the static musl one as openshell-supervisor-static) go next to it, where the
# gateway looks, so `openshell gateway start --drivers process` needs no path
# flags. Extra args go to cargo install (e.g. --debug).
# Install openshell, the sandbox launcher and the supervisors into ROOT/bin (default ~/.cargo/bin).
install root=(env_var("HOME") / ".cargo") *args:
    #!/usr/bin/env bash
    set -euo pipefail
    for pkg in host/cli host/sandbox-launch supervisor; do
        cargo install --locked --target-dir {{target}} --root {{root}} --path $pkg {{args}}
    done
    static=$(mktemp -d)
    trap 'rm -rf "$static"' EXIT
    cargo install --locked --target-dir {{target}} --root "$static" --path supervisor \
        --target x86_64-unknown-linux-musl {{args}}
    install -m 0755 "$static/bin/openshell-supervisor" {{root}}/bin/openshell-supervisor-static
    echo "installed openshell, openshell-sandbox-launch, openshell-supervisor and openshell-supervisor-static in {{root}}/bin"

# Issue 18 item 5, in CI: empty HOME, empty working dir, no OPENSHELL_* settings.
# `just install` into a temp root, then `gateway start --drivers process` (no path flags) runs `sandbox create -- echo hi`.
install-check:
    e2e/install.sh

# Build the driver components (and test fixtures) to WebAssembly.
drivers:
    cargo build --release --target wasm32-wasip2 --manifest-path drivers/Cargo.toml

# Run a gateway on 127.0.0.1:8080 with the process driver and the base image
# (built first, only if its inputs changed), which sandboxes default to
# (state in ./.state).
gateway *args: build
    scripts/image-base.sh
    cargo run -q -p openshell-cli -- gateway start --state-dir .state --drivers process --driver-dir {{wasm_dir}} \
        --import-image ${OPENSHELL_VM_RUNTIME:-runtime}/images/base=openshell/base:bookworm \
        --default-image openshell/base:bookworm {{args}}

# Format everything.
fmt:
    cargo fmt --all
    cargo fmt --manifest-path drivers/Cargo.toml --all

# Formatting, clippy and the dependency checks on both workspaces, warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo fmt --manifest-path drivers/Cargo.toml --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --manifest-path drivers/Cargo.toml --target wasm32-wasip2 --all-targets -- -D warnings
    just deps

# cargo-deny checks bans, licenses and sources (deny.toml), NOT advisories: their
# database is fetched from GitHub, which these machines cannot reach. The license
# list is exactly the host graph's, so one no longer used fails; the drivers' graph
# uses a subset. cargo-machete walks every Cargo.toml under the repo. cargo-machete,
# not cargo-shear: shear's current release needs a newer rustc than our pinned one.
# Dependency checks on both workspaces: cargo-deny and unused dependencies (tools from `just setup`).
deps:
    @test -x {{tools}}/bin/cargo-deny -a -x {{tools}}/bin/cargo-machete || { echo "deps: cargo-deny or cargo-machete missing from {{tools}}: run just setup" >&2; exit 1; }
    {{tools}}/bin/cargo-deny --config deny.toml check --hide-inclusion-graph -D license-not-encountered bans licenses sources
    {{tools}}/bin/cargo-deny --manifest-path drivers/Cargo.toml --config deny.toml check --hide-inclusion-graph -A license-not-encountered bans licenses sources
    {{tools}}/bin/cargo-machete --skip-target-dir

# Every test: unit, integration (SQLite and a throwaway PostgreSQL), CLI and the generic gRPC client.
# The binaries (supervisor, launcher) are built first: tests run them.
test: build
    OPENSHELL_REQUIRE_POSTGRES=1 scripts/pg-test.sh cargo test --workspace
    just grpc-generic
    @# Without OPENSHELL_REQUIRE_VM (`just ci` sets it) a VM test skips when no VM can boot: say so last, where it is seen.
    @[ -n "${OPENSHELL_REQUIRE_VM:-}" ] || echo "just test: WARNING: OPENSHELL_REQUIRE_VM is unset: the VM tests skipped if no VM could boot here (runtime/ not staged?). Run just vm-stage first, or just ci, which requires them." >&2

# A client that knows only proto/ (Python grpcio) calls every RPC of a live gateway.
grpc-generic:
    cargo build -q -p openshell-cli
    .venv/bin/python e2e/grpc_generic_client.py --openshell {{target}}/debug/openshell --proto-dir proto --wasm {{wasm_dir}}/fixture_echo.wasm

# Measure the performance budget and write BENCHMARKS.md (a few minutes; not part of test or ci).
# Release-built (the `perf` profile): gateway, launcher, supervisor, and the static musl
# supervisor VM guests run, in a runtime of its own (runtime-perf/) beside the tests' one.
bench: vm-stage drivers
    cargo build -q --profile perf -p openshell-cli -p openshell-sandbox-launch -p openshell-supervisor -p openshell-bench
    cargo build -q --profile perf -p openshell-supervisor --target x86_64-unknown-linux-musl
    scripts/perf-runtime.sh {{target}}/x86_64-unknown-linux-musl/perf/openshell-supervisor
    OPENSHELL_VM_RUNTIME={{justfile_directory()}}/runtime-perf {{target}}/perf/openshell-bench --write BENCHMARKS.md

# Stage the VM runtime and build the guest initramfs (both idempotent).
vm-stage: vm-setup vm-rootfs

# Prints each stage's time and, at the end (also on failure), all of them.
# What CI runs: lint, stage the VM runtime, every test (the VM ones must run), the install check, then the VM e2e smoke in both modes.
ci:
    #!/usr/bin/env bash
    set -euo pipefail
    source scripts/stage.sh
    stage lint just lint
    stage vm-stage just vm-stage
    stage image-base scripts/image-base.sh
    stage test env OPENSHELL_REQUIRE_VM=1 just test
    stage install-check just install-check
    stage e2e-vm just e2e-vm
    stage "e2e-vm --secure" just e2e-vm --secure

# Stage the VM runtime into ./runtime (QEMU, gvproxy, guest kernel, libkrunfw, busybox) and probe the backend.
vm-setup *args:
    scripts/vm-setup.sh {{args}}

# Build the VM sandboxes' base initramfs (busybox, guest /init, static musl supervisor).
vm-rootfs:
    cargo build -p openshell-supervisor --target x86_64-unknown-linux-musl
    scripts/vm-rootfs.sh {{target}}/x86_64-unknown-linux-musl/debug/openshell-supervisor

# Build the base OCI image (Debian bookworm: Python, pip, git, curl, Node.js, npm) into runtime/images/base; import it as openshell/base:bookworm if a gateway answers.
image-base:
    #!/usr/bin/env bash
    set -euo pipefail
    scripts/image-base.sh
    cli={{target}}/debug/openshell
    layout=${OPENSHELL_VM_RUNTIME:-runtime}/images/base
    if [[ ! -x $cli ]]; then
        echo "image-base: not imported: no CLI at $cli (just build)"
    elif ! "$cli" status >/dev/null 2>&1; then
        echo "image-base: not imported: no gateway answers (openshell status)"
    else
        "$cli" image import "$layout" --name openshell/base:bookworm
    fi

# VM sandboxes end to end on this machine's VM backend (QEMU/TCG here);
# `just e2e-vm --secure` runs it with TLS and auth on.
e2e-vm *args:
    e2e/e2e-vm.sh {{args}}
