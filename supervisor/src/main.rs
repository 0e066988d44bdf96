//! `openshell-supervisor`: the process that makes a sandbox reachable.
//!
//! It reads the gateway endpoint, sandbox id and launch secret from its
//! environment, keeps the secret out of what sandbox code inherits, and
//! dials out ([`session`]): one `ConnectSupervisor` stream, heartbeats both
//! ways, reconnects with backoff. When the gateway asks for a channel, it
//! opens a relay on the same connection ([`relay`]) and runs the request:
//! a command ([`exec`]) or an SSH connection ([`ssh`]), both started the
//! same way ([`spawn`]). Nothing ever connects into the sandbox.

mod egress;
mod exec;
mod files;
mod forward;
mod identity;
mod main_process;
mod relay;
mod report;
mod seccomp;
mod session;
mod spawn;
mod ssh;

use std::collections::BTreeMap;
use std::process::ExitCode;

/// What the supervisor learns from its environment.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoint: String,
    /// Whom to trust on an `https://` endpoint (a VM guest's hop): the
    /// gateway's CA and the name its certificate carries. Required there:
    /// no system roots, no plaintext over a network.
    pub gateway_tls: Option<session::GatewayTrust>,
    pub sandbox_id: String,
    pub secret: String,
    /// Uid sandbox code runs as (inside the sandbox's user namespace).
    pub run_as: Option<u32>,
    /// Environment for sandbox code: ours, minus every OPENSHELL_* secret.
    pub child_env: BTreeMap<String, String>,
    /// Descriptors of the sandbox's `workload` cgroups (`cgroup.procs`,
    /// opened by whoever launched us): each command writes `0` to each
    /// before its exec, so sandbox code runs under the sandbox's limits
    /// while the supervisor stays outside them. Empty where nothing hands
    /// them over.
    pub workload_cgroups: Vec<std::os::fd::RawFd>,
    /// In a sandbox rooted in an image: the image's `User`, as given
    /// (empty: root). Settled into [`Config::image`] at start.
    pub image_user: Option<String>,
    /// Sandbox code's identity in a sandbox rooted in an image
    /// ([`identity`]); `None` otherwise (it runs as [`Config::run_as`]).
    pub image: Option<ImageIdentity>,
    /// Where commands run unless told otherwise: the image's `WorkingDir`,
    /// or `/sandbox`.
    pub workdir: String,
}

/// Sandbox code's user and the nested namespace it joins to be that user.
#[derive(Clone, Debug)]
pub struct ImageIdentity {
    pub user: identity::ImageUser,
    /// Open for the supervisor's life, close-on-exec.
    pub userns: std::os::fd::RawFd,
}

/// Variables an image-rooted launch sets: the image's `User` and
/// `WorkingDir`.
const IMAGE_USER: &str = "OPENSHELL_IMAGE_USER";
const IMAGE_WORKDIR: &str = "OPENSHELL_IMAGE_WORKDIR";

/// The variable naming [`Config::workload_cgroups`].
const WORKLOAD_FDS: &str = "OPENSHELL_WORKLOAD_CGROUP_FDS";

/// Why the supervisor cannot start from its environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not set")]
    Missing { name: &'static str },
    #[error(
        "OPENSHELL_ENDPOINT is https:// but OPENSHELL_GATEWAY_CA or OPENSHELL_GATEWAY_NAME is not set: the supervisor trusts only the gateway's own CA"
    )]
    NoTrust,
    #[error("{WORKLOAD_FDS}={value:?} is not a comma-separated list of descriptors")]
    BadFds { value: String },
    #[error("{WORKLOAD_FDS} names descriptor {fd}, which is not open")]
    FdNotOpen { fd: std::os::fd::RawFd },
    #[error("OPENSHELL_SANDBOX_UID={value:?} is not a uid")]
    BadUid {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
}

/// Variables that sandbox code never sees.
const PRIVATE_VARS: [&str; 5] = [
    "OPENSHELL_SANDBOX_SECRET",
    "OPENSHELL_SANDBOX_UID",
    WORKLOAD_FDS,
    IMAGE_USER,
    IMAGE_WORKDIR,
];

impl Config {
    fn from_env(vars: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let all: BTreeMap<String, String> = vars.collect();
        let need = |name: &'static str| {
            all.get(name)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(ConfigError::Missing { name })
        };
        let run_as = match all.get("OPENSHELL_SANDBOX_UID") {
            Some(v) => Some(v.parse().map_err(|source| ConfigError::BadUid {
                value: v.chars().take(40).collect(),
                source,
            })?),
            None => None,
        };
        let workload_cgroups = match all.get(WORKLOAD_FDS).filter(|v| !v.is_empty()) {
            Some(v) => v
                .split(',')
                .map(|fd| fd.parse().ok().filter(|fd| *fd > 2))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| ConfigError::BadFds {
                    value: v.chars().take(40).collect(),
                })?,
            None => Vec::new(),
        };
        let mut child_env = all.clone();
        for k in PRIVATE_VARS {
            child_env.remove(k);
        }
        child_env.entry("PATH".into()).or_insert_with(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        // Ordinary clients reach the outside through our proxy.
        for (k, v) in egress::proxy_env() {
            child_env.entry(k.into()).or_insert(v);
        }
        // In an image's sandbox HOME comes from its passwd, once settled.
        if !all.contains_key(IMAGE_USER) {
            child_env
                .entry("HOME".into())
                .or_insert_with(|| "/sandbox".into());
        }
        let endpoint = need("OPENSHELL_ENDPOINT")?;
        let gateway_tls = if endpoint.starts_with("https://") {
            let ca = need("OPENSHELL_GATEWAY_CA").map_err(|_| ConfigError::NoTrust)?;
            let name = need("OPENSHELL_GATEWAY_NAME").map_err(|_| ConfigError::NoTrust)?;
            Some(session::GatewayTrust {
                // One environment line: the PEM's newlines arrive as `\n`.
                ca_pem: ca.replace("\\n", "\n"),
                server_name: name,
            })
        } else {
            None
        };
        Ok(Self {
            endpoint,
            gateway_tls,
            sandbox_id: need("OPENSHELL_SANDBOX_ID")?,
            secret: need("OPENSHELL_SANDBOX_SECRET")?,
            run_as,
            child_env,
            workload_cgroups,
            image_user: all.get(IMAGE_USER).cloned(),
            image: None,
            workdir: all
                .get(IMAGE_WORKDIR)
                .filter(|w| w.starts_with('/'))
                .cloned()
                .unwrap_or_else(|| spawn::DEFAULT_WORKDIR.into()),
        })
    }

    /// In a sandbox rooted in an image: resolves the image's user in its
    /// root, makes the nested namespace sandbox code joins, and hands it
    /// `/sandbox`. Must run before any thread starts.
    fn settle_image_identity(&mut self) -> Result<(), identity::IdentityError> {
        use std::os::fd::IntoRawFd;
        let Some(user) = &self.image_user else {
            return Ok(());
        };
        let user = identity::resolve_in_root(user)?;
        let userns = identity::nested_namespace()?.into_raw_fd();
        identity::own_workdir(&user)?;
        identity::default_env(&user, &mut self.child_env);
        self.image = Some(ImageIdentity { user, userns });
        Ok(())
    }

    /// Takes the workload descriptors for this process's lifetime: each
    /// must be open, and becomes close-on-exec (sandbox code never holds
    /// one).
    fn claim_workload_cgroups(&self) -> Result<(), ConfigError> {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        for &fd in &self.workload_cgroups {
            #[allow(unsafe_code, reason = "claiming an inherited descriptor")]
            // SAFETY: the launcher handed this descriptor to us and nothing
            // else in this process owns it; it stays open until we exit.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|_| ConfigError::FdNotOpen { fd })?;
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    // Re-executed as the file helper, as the sandbox's user ([`files`]).
    let args: Vec<_> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == files::HELPER_ARG) {
        return files::helper_main(&args[2..]);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OPENSHELL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match Config::from_env(std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("openshell-supervisor: {}", report::chain(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = cfg.claim_workload_cgroups() {
        eprintln!("openshell-supervisor: {}", report::chain(&e));
        return ExitCode::from(2);
    }
    if let Err(e) = cfg.settle_image_identity() {
        eprintln!("openshell-supervisor: {}", report::chain(&e));
        return ExitCode::from(2);
    }
    for k in PRIVATE_VARS {
        #[allow(unsafe_code, reason = "scrubbing the secret before any thread starts")]
        // SAFETY: still single-threaded: no runtime or other thread exists
        // yet that could read the environment concurrently.
        unsafe {
            std::env::remove_var(k)
        };
    }
    if let Err(e) = seccomp::program() {
        eprintln!("openshell-supervisor: {}", report::chain(e));
        return ExitCode::from(2);
    }
    let ssh = match ssh::SshServer::generate() {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            eprintln!("openshell-supervisor: {}", report::chain(&e));
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("openshell-supervisor: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    rt.block_on(session::run_forever(cfg, ssh));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn the_secret_never_reaches_sandbox_code() {
        let c = Config::from_env(vars(&[
            ("OPENSHELL_ENDPOINT", "unix:///run/openshell/gateway.sock"),
            ("OPENSHELL_SANDBOX_ID", "id"),
            ("OPENSHELL_SANDBOX_SECRET", "s3cret"),
            ("OPENSHELL_SANDBOX_UID", "1000"),
            ("USER_VAR", "kept"),
        ]))
        .unwrap();
        assert_eq!(c.secret, "s3cret");
        assert_eq!(c.run_as, Some(1000));
        assert!(!c.child_env.contains_key("OPENSHELL_SANDBOX_SECRET"));
        assert!(!c.child_env.values().any(|v| v == "s3cret"));
        assert_eq!(c.child_env["USER_VAR"], "kept");
        assert!(c.child_env.contains_key("PATH"));
    }

    #[test]
    fn missing_settings_are_named() {
        let e = Config::from_env(vars(&[("OPENSHELL_SANDBOX_ID", "id")])).unwrap_err();
        assert_eq!(
            e,
            ConfigError::Missing {
                name: "OPENSHELL_ENDPOINT"
            }
        );
        assert_eq!(e.to_string(), "OPENSHELL_ENDPOINT is not set");
    }

    #[test]
    fn a_bad_uid_is_quoted_and_keeps_its_cause() {
        let e = Config::from_env(vars(&[
            ("OPENSHELL_ENDPOINT", "unix:///x"),
            ("OPENSHELL_SANDBOX_ID", "id"),
            ("OPENSHELL_SANDBOX_SECRET", "s"),
            ("OPENSHELL_SANDBOX_UID", "root"),
        ]))
        .unwrap_err();
        assert!(matches!(&e, ConfigError::BadUid { value, .. } if value == "root"));
        assert!(std::error::Error::source(&e).is_some());
    }

    proptest::proptest! {
        /// Fuzzing (issue 8): any environment either names what is missing
        /// or yields a config whose child environment holds no private
        /// variable.
        #[test]
        fn any_environment_parses_safely(
            pairs in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::strategy::Just("OPENSHELL_ENDPOINT".to_owned()),
                        proptest::strategy::Just("OPENSHELL_SANDBOX_ID".to_owned()),
                        proptest::strategy::Just("OPENSHELL_SANDBOX_SECRET".to_owned()),
                        proptest::strategy::Just("OPENSHELL_SANDBOX_UID".to_owned()),
                        "[A-Z_]{1,8}",
                    ],
                    "\\PC{0,12}|[0-9]{1,10}",
                ),
                0..10,
            )
        ) {
            match Config::from_env(pairs.into_iter()) {
                Ok(c) => {
                    for k in PRIVATE_VARS {
                        proptest::prop_assert!(!c.child_env.contains_key(k));
                    }
                    proptest::prop_assert!(!c.secret.is_empty() && !c.endpoint.is_empty());
                    proptest::prop_assert!(c.child_env.contains_key("PATH"));
                }
                Err(e) => proptest::prop_assert!(e.to_string().starts_with("OPENSHELL_"), "{}", e),
            }
        }
    }

    /// Issue 14, item 5: an https endpoint without the gateway's CA is a
    /// configuration error, not a connection with system roots.
    #[test]
    fn an_https_endpoint_needs_the_gateways_ca_and_name() {
        let base = [
            ("OPENSHELL_ENDPOINT", "https://192.168.127.254:4000"),
            ("OPENSHELL_SANDBOX_ID", "s1"),
            ("OPENSHELL_SANDBOX_SECRET", "x"),
        ];
        let vars = |extra: &[(&str, &str)]| {
            base.iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            Config::from_env(vars(&[])).unwrap_err(),
            ConfigError::NoTrust
        );
        assert_eq!(
            Config::from_env(vars(&[("OPENSHELL_GATEWAY_CA", "pem")])).unwrap_err(),
            ConfigError::NoTrust
        );
        let c = Config::from_env(vars(&[
            (
                "OPENSHELL_GATEWAY_CA",
                "-----BEGIN X-----\\nAAAA\\n-----END X-----",
            ),
            ("OPENSHELL_GATEWAY_NAME", "openshell-gateway"),
        ]))
        .unwrap();
        let t = c.gateway_tls.unwrap();
        assert_eq!(t.ca_pem, "-----BEGIN X-----\nAAAA\n-----END X-----");
        assert_eq!(t.server_name, "openshell-gateway");
    }
}
