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
    /// Carries one SSH connection to a sandbox over stdin and stdout: the
    /// ProxyCommand that `openshell sandbox ssh-config` writes.
    #[command(hide = true)]
    SshProxy { name: String },
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
    /// holds every sandbox's files with a quota each; 0 keeps them in plain
    /// directories without quotas.
    #[arg(long, env = "OPENSHELL_SANDBOX_DISK_GIB", default_value_t = 64)]
    pub sandbox_disk_gib: u64,
    /// What one sandbox may store on the host's disk, in MiB (its
    /// `/sandbox`, a VM's files, its logs); past it writes fail with EDQUOT.
    #[arg(long, env = "OPENSHELL_SANDBOX_DISK_QUOTA_MIB", default_value_t = 10240,
          value_parser = clap::value_parser!(u64).range(16..))]
    pub sandbox_disk_quota_mib: u64,
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
    /// Streams a sandbox's changes.
    Watch {
        name: String,
        /// Stop once the sandbox is Ready, in Error or Deleting.
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
    #[arg(long, default_value_t = 0)]
    pub vcpus: u32,
    #[arg(long, default_value_t = 0)]
    pub memory_mib: u64,
    #[arg(long, default_value_t = 0)]
    pub max_processes: u32,
    /// Client token that makes a retried create idempotent.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Return once the sandbox is recorded, without waiting for Ready.
    #[arg(long)]
    pub no_wait: bool,
    /// Seconds to wait for Ready.
    #[arg(long, env = "OPENSHELL_PROVISION_TIMEOUT", default_value_t = 300)]
    pub timeout: u64,
    /// Delete the sandbox after the command finishes.
    #[arg(long, requires = "command")]
    pub rm: bool,
    /// Command to run once Ready; the CLI exits with its code.
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
    fn the_grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
