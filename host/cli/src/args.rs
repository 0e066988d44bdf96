//! Command-line grammar. Parsing only; no I/O.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "openshell",
    version,
    about = "Isolated sandboxes for AI agents"
)]
pub struct Cli {
    /// Gateway address, e.g. https://127.0.0.1:8080; default: the client
    /// config written by `openshell gateway start`, else http://127.0.0.1:8080.
    #[arg(long, global = true, env = "OPENSHELL_GATEWAY_ENDPOINT")]
    pub gateway_endpoint: Option<String>,
    /// The gateway's CA certificate (its state dir's tls/ca.crt), for a
    /// gateway whose client config this machine does not have.
    #[arg(long, global = true, env = "OPENSHELL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per run; the gateway's flags are the big one"
)]
pub enum Command {
    /// Checks that the gateway answers.
    Status,
    /// Runs the gateway.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Creates, inspects and deletes sandboxes.
    #[command(subcommand, visible_alias = "sb")]
    Sandbox(SandboxCmd),
    /// Manages driver plugins (WebAssembly components).
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Pulls, imports, lists and removes OCI images in the gateway's store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Network policies: what a sandbox's code may reach.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Lists and stops background port forwards (`sandbox forward --background`).
    #[command(subcommand)]
    Forward(ForwardCmd),
    /// Carries one SSH connection to a sandbox over stdin and stdout: the
    /// ProxyCommand that `openshell sandbox ssh-config` writes.
    #[command(hide = true)]
    SshProxy { name: String },
    /// Prints a shell completion script: `source <(openshell completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Checks that this host can run sandboxes and says what to fix.
    Doctor(Doctor),
}

#[derive(Args, Debug)]
pub struct Doctor {
    /// The state dir to check for free space; default: the gateway's.
    #[arg(long, env = "OPENSHELL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The VM runtime to check (as `gateway start --vm-runtime`).
    #[arg(long, env = "OPENSHELL_VM_RUNTIME")]
    pub vm_runtime: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Replaces a sandbox's network policy (YAML) as a whole; in force, and
    /// open connections it no longer allows closed, when this returns.
    Set {
        name: String,
        file: PathBuf,
        /// Refuse unless the policy in force is at this revision.
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// Prints a sandbox's policy in force (YAML on stdout; its revision
    /// and source on stderr).
    Get { name: String },
    /// Checks a policy file without a gateway: the rules it defines, or
    /// the line and the reason it is refused.
    Check { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum ForwardCmd {
    /// Lists the background forwards started from this machine.
    #[command(visible_alias = "ls")]
    List,
    /// Stops background forwards: a sandbox's (all, or the one on LOCAL),
    /// or every one with --all.
    Stop {
        /// SANDBOX or SANDBOX:LOCAL.
        #[arg(required_unless_present = "all")]
        target: Option<String>,
        #[arg(long, conflicts_with = "target")]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum GatewayCmd {
    /// Starts a gateway in the foreground.
    Start(GatewayStart),
}

#[derive(Args, Debug)]
pub struct GatewayStart {
    /// TCP port; 0 picks a free one.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, env = "OPENSHELL_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// sqlite:PATH, sqlite::memory: or postgres://...; default: a SQLite file in the state dir.
    #[arg(long, env = "OPENSHELL_DB_URL")]
    pub db_url: Option<String>,
    /// Where the gateway keeps its database, plugins and sandbox state.
    #[arg(long, env = "OPENSHELL_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Bundled drivers to load, comma-separated (process, vm).
    #[arg(long, env = "OPENSHELL_DRIVERS", value_delimiter = ',')]
    pub drivers: Vec<String>,
    /// Directory holding openshell_driver_<name>.wasm.
    #[arg(long, env = "OPENSHELL_DRIVER_DIR")]
    pub driver_dir: Option<PathBuf>,
    /// Serve plaintext (development only).
    #[arg(long)]
    pub disable_tls: bool,
    /// Accept requests without a token (development only).
    #[arg(long)]
    pub disable_gateway_auth: bool,
    /// VM backend: auto (the cached probe's verdict), krun or qemu.
    #[arg(long, env = "OPENSHELL_VM_BACKEND", default_value = "auto")]
    pub vm_backend: String,
    /// The VM runtime staged by `just vm-setup` and `just vm-rootfs`.
    #[arg(long, env = "OPENSHELL_VM_RUNTIME")]
    pub vm_runtime: Option<PathBuf>,
    /// Extra DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "tls-san")]
    pub tls_sans: Vec<String>,
    /// Seconds one driver plugin call may run before it is abandoned.
    #[arg(long, default_value_t = 10)]
    pub plugin_call_timeout_secs: u64,
    /// Supervisor heartbeat interval in milliseconds; a session silent for two is dropped.
    #[arg(long, default_value_t = 15_000)]
    pub heartbeat_ms: u64,
    /// Relays that may wait for a supervisor, in total.
    #[arg(long, default_value_t = 256)]
    pub max_pending_relays: usize,
    /// Relays that may wait for one sandbox's supervisor.
    #[arg(long, default_value_t = 32)]
    pub max_pending_relays_per_sandbox: usize,
    /// Milliseconds a supervisor has to open a requested relay.
    #[arg(long, default_value_t = 10_000)]
    pub relay_claim_timeout_ms: u64,
    /// Seconds without traffic after which a relay is closed.
    #[arg(long, default_value_t = 3600)]
    pub relay_idle_timeout_secs: u64,
    /// Sandboxes that may exist at once; past it creates get RESOURCE_EXHAUSTED with a retry hint.
    #[arg(long, env = "OPENSHELL_MAX_SANDBOXES", default_value_t = 256)]
    pub max_sandboxes: usize,
    /// Driver launches that may run at once; more wait their turn.
    #[arg(long, default_value_t = 32)]
    pub max_concurrent_launches: usize,
    /// Host uid where sandboxes' id ranges start (65536 ids each, 16384
    /// slots); default: what the state dir recorded, 2^31 for a new one.
    /// Refused if it overlaps /etc/subuid or /etc/subgid.
    #[arg(long, env = "OPENSHELL_UID_BASE")]
    pub uid_base: Option<u32>,
    /// Size in GiB of the sparse image (`STATE/sandboxes.img`, btrfs) that
    /// holds every sandbox's files with a quota each, set when the image
    /// is made; 0 keeps them in plain directories without quotas.
    #[arg(long, env = "OPENSHELL_SANDBOX_DISK_GIB", default_value_t = 64)]
    pub sandbox_disk_gib: u64,
    /// What a sandbox created without --disk-gib may store on the host's
    /// disk, in GiB (its files, an image's changes, a VM's disk, logs);
    /// past it writes fail. Default: 8, or the whole sandbox disk if smaller.
    #[arg(long, env = "OPENSHELL_DEFAULT_DISK_GIB",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub default_disk_gib: Option<u32>,
    /// Replaced by --default-disk-gib (GiB) and `sandbox create --disk-gib`;
    /// refused with that advice, since a size in MiB has no exact GiB.
    #[arg(long, env = "OPENSHELL_SANDBOX_DISK_QUOTA_MIB", hide = true)]
    pub sandbox_disk_quota_mib: Option<u64>,
    /// GiB that must stay free on the state dir's filesystem: below it,
    /// creates are refused (RESOURCE_EXHAUSTED) before anything is
    /// stored; 0 turns the reserve off.
    #[arg(long, env = "OPENSHELL_DISK_RESERVE_GIB", default_value_t = 2)]
    pub disk_reserve_gib: u64,
    /// The process-sandbox launcher; default: next to this binary.
    #[arg(long, env = "OPENSHELL_LAUNCHER")]
    pub launcher: Option<PathBuf>,
    /// The in-sandbox supervisor binary; default: next to this binary.
    #[arg(long, env = "OPENSHELL_SUPERVISOR")]
    pub supervisor: Option<PathBuf>,
    /// The static (musl) supervisor for sandboxes rooted in an image;
    /// default: `openshell-supervisor-static` next to this binary, else
    /// cargo's x86_64-unknown-linux-musl build of the same profile.
    #[arg(long, env = "OPENSHELL_STATIC_SUPERVISOR")]
    pub static_supervisor: Option<PathBuf>,
    /// Image for process sandboxes created without --image (a reference
    /// or an imported image's name); default: none (the host's /usr).
    #[arg(long, env = "OPENSHELL_DEFAULT_IMAGE")]
    pub default_image: Option<String>,
    /// The network policy (YAML) of sandboxes created without --policy,
    /// copied into each at create; default: none (they reach nothing).
    #[arg(long, env = "OPENSHELL_DEFAULT_POLICY", value_name = "FILE")]
    pub default_policy: Option<PathBuf>,
    /// A hosts file (`ADDRESS NAME...` lines) the gateway resolves sandbox
    /// destinations with before the system resolver.
    #[arg(long, env = "OPENSHELL_EGRESS_HOSTS", value_name = "FILE")]
    pub egress_hosts: Option<PathBuf>,
    /// Outbound connections one sandbox may hold open at once.
    #[arg(long, default_value_t = 256)]
    pub egress_max_connections: usize,
    /// Bytes per second one sandbox's outbound connections may move (both
    /// ways together); 0: unbounded.
    #[arg(long, default_value_t = 0)]
    pub egress_bytes_per_second: u64,
    /// An OCI layout, OCI archive or `docker save` tarball to import at
    /// start, before the gateway listens (repeatable; `PATH=NAME` names
    /// it). Layers already in the store are not unpacked again.
    #[arg(long = "import-image", value_name = "PATH[=NAME]")]
    pub import_images: Vec<String>,
    /// Registry (host or host:port) that may be pulled from over plain
    /// HTTP (repeatable); every other registry is HTTPS only.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// USER:PASSWORD for registries (overrides ~/.docker/config.json).
    #[arg(long, env = "OPENSHELL_REGISTRY_AUTH", value_name = "USER:PASSWORD")]
    pub registry_auth: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCmd {
    /// Creates a sandbox and waits until it is Ready.
    Create(SandboxCreate),
    /// Shows one sandbox.
    Get { name: String },
    /// Lists sandboxes.
    List {
        /// Print only names, one per line.
        #[arg(long, conflicts_with = "ids")]
        names: bool,
        /// Print only ids, one per line.
        #[arg(long)]
        ids: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Deletes sandboxes and waits until they are gone.
    Delete {
        #[arg(required_unless_present = "all")]
        names: Vec<String>,
        /// Delete every sandbox.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Runs a command in a Ready sandbox; exits with its exit code.
    Exec {
        name: String,
        /// Working directory inside the sandbox (default /sandbox).
        #[arg(long)]
        workdir: Option<String>,
        /// Seconds before the command is killed (exit 124); 0 = none.
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// Environment variable for the command (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copies a local file or directory into a Ready sandbox, as `cp -r`
    /// would: into DST when that is a directory there, else as DST
    /// (default: the sandbox's working directory). Modes and symlinks are
    /// kept.
    Upload {
        name: String,
        src: PathBuf,
        dst: Option<String>,
        /// Replace files that exist.
        #[arg(long)]
        overwrite: bool,
    },
    /// Copies a file or directory out of a Ready sandbox, as `cp -r` would
    /// (default DST: the current directory; `-` writes a tar stream to
    /// stdout). Symlinks arrive as links, never followed.
    Download {
        name: String,
        src: String,
        dst: Option<PathBuf>,
        /// Replace files that exist.
        #[arg(long)]
        overwrite: bool,
    },
    /// Forwards a local TCP port to a port on a Ready sandbox's own
    /// loopback until Ctrl-C. LOCAL defaults to REMOTE; 0 picks a free one.
    Forward {
        name: String,
        #[arg(value_name = "[LOCAL:]REMOTE", value_parser = parse_forward)]
        ports: (u16, u16),
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: IpAddr,
        /// Run detached; `openshell forward list` and `forward stop` manage it.
        #[arg(long)]
        background: bool,
    },
    /// Shows a sandbox's log: its main process's output (stdout lines on
    /// stdout, stderr lines on stderr) and lifecycle events (on stderr).
    Logs {
        name: String,
        /// Keep printing new records until Ctrl-C or the sandbox is deleted.
        #[arg(short, long)]
        follow: bool,
        /// Only records newer than this (e.g. 30s, 5m, 2h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
        /// Only the last N records (before following).
        #[arg(long)]
        tail: Option<u32>,
        /// Prefix each record with its time (RFC 3339, UTC).
        #[arg(long, short = 't')]
        timestamps: bool,
        /// Show the sandbox's network decisions (one JSON object per
        /// connection allowed or refused) instead.
        #[arg(long)]
        network: bool,
    },
    /// Opens an interactive login shell in a Ready sandbox.
    Connect {
        name: String,
        /// Shell to run instead of the sandbox's login shell.
        #[arg(long)]
        shell: Option<String>,
    },
    /// Prints an OpenSSH `Host` block for a Ready sandbox (for `ssh -F`
    /// or ~/.ssh/config) and pins its host key in a known_hosts file.
    SshConfig { name: String },
    /// Stops Ready sandboxes: their processes (or VM) end, their files,
    /// spec and record stay (phase Stopped). Stopping a Stopped one is a
    /// no-op.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Starts a Stopped sandbox again and waits until it is Ready.
    Start {
        name: String,
        /// Return at once, without waiting for Ready.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for Ready.
        #[arg(long, env = "OPENSHELL_PROVISION_TIMEOUT", default_value_t = 300)]
        timeout: u64,
    },
    /// Shows what a sandbox uses (CPU, memory, pids, disk) against its limits.
    Stats { name: String },
    /// Streams a sandbox's changes.
    Watch {
        name: String,
        /// Stop once the sandbox is Ready, in Error, Deleting or Stopped.
        #[arg(long)]
        until_settled: bool,
    },
}

#[derive(Args, Debug)]
pub struct SandboxCreate {
    #[arg(long)]
    pub name: Option<String>,
    /// Driver plugin; optional when the gateway has exactly one.
    #[arg(long)]
    pub driver: Option<String>,
    /// Environment variable for sandbox code (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// OCI image to root the sandbox in: a registry reference
    /// (`python:3.12`, `registry.example:5000/team/py:3.12`,
    /// `name@sha256:...`) or an imported image's name; pulled if missing.
    #[arg(long)]
    pub image: Option<String>,
    /// Network policy (YAML) for the sandbox; replaces the gateway's
    /// default. Without one and without a default, nothing is reachable.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 0)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 0)]
    pub max_processes: u32,
    /// GiB the sandbox may store on the host (everything it writes counts;
    /// past it writes fail), at most the gateway's sandbox disk; default:
    /// the gateway's (8 GiB unless its operator chose otherwise).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub disk_gib: Option<u32>,
    /// Delete the sandbox this long after its create, whatever it is
    /// doing (a duration: 90s, 30m, 2h, 1d, 1h30m; at most 366d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub ttl: Option<u64>,
    /// Stop the sandbox (files kept; `sandbox start` resumes it) once it
    /// has had no exec or SSH for this long (a duration, as for --ttl).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle_timeout: Option<u64>,
    /// Client token that makes a retried create idempotent.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Return once the sandbox is recorded, without waiting for Ready.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for Ready.
    #[arg(long, env = "OPENSHELL_PROVISION_TIMEOUT", default_value_t = 300)]
    pub timeout: u64,
    /// Copy a local directory or file in once Ready, before the command
    /// runs (repeatable); DST defaults to the working directory.
    #[arg(long, value_name = "DIR[:DST]")]
    pub upload: Vec<String>,
    /// Delete the sandbox after the command finishes.
    #[arg(long, requires = "command")]
    pub rm: bool,
    /// The sandbox's main process, run once Ready: it keeps running if this
    /// command is interrupted, its output is kept (`sandbox logs`); the CLI
    /// prints that output and exits with its code. Stdin is not forwarded
    /// (use `sandbox exec`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// Uploads a driver component to the gateway.
    Load {
        path: PathBuf,
        /// Name to install it under; default: the file name without extension.
        #[arg(long)]
        name: Option<String>,
        /// Capability to grant (repeatable): log, files, image, process, network, rootfs, vm.
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    /// Lists loaded plugins.
    List,
    /// Removes a plugin.
    Unload {
        name: String,
        /// Unload even while sandboxes use it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Pulls an image from its registry into the gateway's store.
    Pull { reference: String },
    /// Imports an OCI layout directory, an OCI archive or a `docker save`
    /// tarball.
    Import {
        path: PathBuf,
        /// Name to store it under; default: the archive's own.
        #[arg(long)]
        name: Option<String>,
    },
    /// Lists stored images and the sandboxes using them.
    #[command(visible_alias = "ls")]
    List,
    /// Removes an image (a name or a digest), then what nothing uses.
    Rm {
        name: String,
        /// Remove it even while sandboxes use it (they keep running).
        #[arg(long)]
        force: bool,
    },
}

/// A duration (`90s`, `30m`, `1h30m`, `2d`; humantime's grammar) as whole
/// seconds. Zero is refused: leaving the flag out means none.
pub fn parse_duration(raw: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(raw.trim()).map_err(|_| {
        format!(
            "{raw:?} is not a duration: use a number and a unit (s, m, h or d), like 90s, 30m, 2h, 1d or 1h30m"
        )
    })?;
    if d.as_secs() == 0 {
        return Err(format!(
            "{raw:?} is zero: give a positive duration, or leave the flag out for none"
        ));
    }
    Ok(d.as_secs())
}

fn parse_forward(s: &str) -> Result<(u16, u16), String> {
    crate::forward::parse_spec(s)
}

fn parse_env(raw: &str) -> Result<(String, String), String> {
    let (k, v) = raw
        .split_once('=')
        .ok_or_else(|| format!("{raw:?} is not KEY=VALUE"))?;
    if !openshell_core::validate::is_env_key(k) {
        return Err(format!(
            "{k:?} is not a valid variable name: use [A-Za-z_][A-Za-z0-9_]*"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags_must_be_key_value() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("novalue").is_err());
        assert!(parse_env("1X=y").is_err());
    }

    #[test]
    fn durations_are_number_unit_pairs() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert_eq!(
            parse_duration("1.5h"),
            Ok(5400),
            "humantime takes fractions"
        );
        for bad in ["", "30", "m", "1x", "-1h", "h1", "99999999999999999999d"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("like 90s, 30m"), "{bad}: {e}");
        }
        assert!(parse_duration("0s").unwrap_err().contains("zero"));
    }

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
