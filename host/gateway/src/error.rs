//! What a request can fail with, by meaning, and the one function that turns
//! it into the gRPC status a client sees. No other module builds a
//! `tonic::Status` (the token interceptor in `server.rs` aside).

use std::time::Duration;

use openshell_core::{NameError, Phase, SpecError};
use openshell_image::ImageError;
use openshell_plugin::{CallError, GrantError, PluginError};
use openshell_store::StoreError;
use tonic::{Code, Status};

/// The longest client-supplied text echoed back in an error message.
const MAX_ECHO: usize = 128;

/// A client-supplied string, shortened for an error message.
pub fn echo(s: &str) -> String {
    if s.len() <= MAX_ECHO {
        return format!("{s:?}");
    }
    let mut end = MAX_ECHO;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("give a sandbox name or id")]
    NoSandboxNamed,
    #[error("no sandbox named {}; `openshell sandbox list` shows what exists", echo(.name))]
    SandboxNotFound { name: String },
    #[error("a sandbox named {name:?} already exists; choose another name or delete it first")]
    NameTaken { name: String },
    #[error("could not find a free sandbox name; retry or pass --name")]
    NoFreeName,
    #[error("every host uid range is taken ({slots} sandboxes hold one); delete some sandboxes")]
    NoFreeUidSlot { slots: u32 },
    #[error("a concurrent create with this request_id is in flight; retry")]
    CreateInFlight,
    #[error(
        "no driver plugins are loaded: start the gateway with --drivers, or run `openshell plugin load`"
    )]
    NoDriverLoaded,
    #[error("this gateway has several drivers ({loaded}); choose one with --driver")]
    AmbiguousDriver { loaded: String },
    #[error(
        "driver {driver:?} is not loaded; loaded drivers: [{loaded}]. Load it with `openshell plugin load`"
    )]
    DriverNotLoaded { driver: String, loaded: String },
    #[error("no plugin named {}; `openshell plugin list` shows what is loaded", echo(.name))]
    PluginNotFound { name: String },
    #[error(
        "{count} sandbox(es) use plugin {name:?} (for example {example:?}); delete them first or pass --force"
    )]
    PluginInUse {
        name: String,
        count: u64,
        example: String,
    },
    #[error(
        "sandbox {name} is {}, not Ready; wait for it (`openshell sandbox watch {name} --until-settled`)",
        .phase.as_str()
    )]
    NotReady { name: String, phase: Phase },
    #[error("sandbox {name} is Stopped; start it with `openshell sandbox start {name}`")]
    Stopped { name: String },
    #[error(
        "sandbox {name} is {}, so it cannot be {action}{}",
        .phase.as_str(),
        phase_hint(*.phase, .name)
    )]
    WrongPhase {
        name: String,
        phase: Phase,
        action: &'static str,
    },
    #[error("sandbox {name}'s supervisor is not connected; retry shortly")]
    SupervisorNotConnected { name: String },
    #[error("sandbox {name}'s supervisor did not open the relay in time")]
    RelayNotOpened { name: String },
    #[error("sandbox {name} already has a main process; run more with `openshell sandbox exec`")]
    MainExists { name: String },
    #[error("the gateway cannot keep the sandbox's log: {0}")]
    Logs(#[source] std::io::Error),
    /// The supervisor's reason is sandbox-controlled text: shown quoted
    /// and bounded.
    #[error("sandbox {name} could not open the channel: {}", echo(.reason))]
    RelayRefused { name: String, reason: String },
    /// A file transfer the sandbox's file helper refused; `message` is
    /// its (bounded) complaint.
    #[error("in sandbox {name}: {message}")]
    Transfer {
        name: String,
        kind: openshell_files::FailureKind,
        message: String,
    },
    #[error("the sandbox's supervisor went away before {what}{}", in_parens(.detail))]
    SupervisorGone { what: &'static str, detail: String },
    #[error("the relay was idle for {} s and was closed", .idle.as_secs())]
    RelayIdle { idle: Duration },
    #[error("{count} relays are already waiting {scope} (limit {limit}); retry shortly")]
    RelaysWaiting {
        scope: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("no relay {} is waiting for this sandbox", echo(.channel))]
    UnknownRelay { channel: String },
    #[error(
        "egress is opened only by this sandbox's supervisor, with its live session's egress token"
    )]
    NoEgressSession,
    /// A policy document that does not parse or validate; the message
    /// names the line (or field) and what to fix.
    #[error("the policy is invalid: {0}")]
    Policy(#[source] Box<openshell_policy::PolicyError>),
    #[error(
        "sandbox {name}'s policy is at revision {current}, not {expected}; read it again (`openshell policy get {name}`) and retry"
    )]
    PolicyRevision {
        name: String,
        current: u64,
        expected: u64,
    },
    #[error(
        "sandbox {name}'s supervisor has no SSH server (it reported no host key); recreate the sandbox with a current supervisor"
    )]
    NoSshServer { name: String },
    #[error(
        "sandbox {name}'s supervisor is not connected, so its SSH host key is unknown; wait until it is Ready (`openshell sandbox watch {name} --until-settled`)"
    )]
    NoSshHostKey { name: String },
    /// The first message of a stream was not the one the RPC starts with.
    #[error("the first {rpc} message must be `{expected}`")]
    FirstMessage {
        rpc: &'static str,
        expected: &'static str,
    },
    #[error("no `{expected}` message within {} s", .within.as_secs())]
    FirstMessageTimeout {
        expected: &'static str,
        within: Duration,
    },
    /// A request field that is wrong in a way the message explains.
    #[error("{0}")]
    BadField(String),
    #[error("{what} is {len} bytes; the limit is {limit}{hint}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
        hint: &'static str,
    },
    /// Over a capacity limit; the client should retry after `retry_after`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: Duration,
    },
    /// The host's disk is too full for another sandbox. No retry hint:
    /// waiting frees nothing.
    #[error(
        "the filesystem holding the gateway's state dir has {} free, below the gateway's disk reserve of {reserve_gib} GiB: free space there (delete sandboxes, `openshell image rm` unused images) or start the gateway with a smaller --disk-reserve-gib (0 turns the reserve off)",
        gib(*.free_bytes)
    )]
    DiskReserve { free_bytes: u64, reserve_gib: u64 },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("the transport failed: {0}")]
    Transport(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// Boxed: image errors are large and every request result carries one.
    #[error(transparent)]
    Image(Box<ImageError>),
    #[error("this gateway has no image store")]
    NoImageStore,
    #[error("cannot stage the uploaded image archive: {0}")]
    ImageUpload(#[source] std::io::Error),
    #[error("no image named {}; `openshell image list` shows what is stored", echo(.name))]
    ImageNotFound { name: String },
    #[error(
        "{count} sandbox(es) use image {} (for example {example:?}); delete them first or pass --force",
        echo(.image)
    )]
    ImageInUse {
        image: String,
        count: usize,
        example: String,
    },
    #[error("driver {driver}: {source}")]
    Driver {
        driver: String,
        #[source]
        source: CallError,
    },
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        ApiError::Image(Box::new(e))
    }
}

/// Bytes in GiB, to a tenth.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// What to do about a sandbox whose phase refused a stop or start.
fn phase_hint(phase: Phase, name: &str) -> String {
    match phase {
        Phase::Provisioning | Phase::Unknown => format!(
            ": it is being launched; wait until it is Ready (`openshell sandbox watch {name} --until-settled`)"
        ),
        Phase::Error => format!(": it failed; see `openshell sandbox get {name}`, then delete it"),
        Phase::Deleting => ": it is being deleted".to_owned(),
        Phase::Ready | Phase::Stopped => String::new(),
    }
}

fn in_parens(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(" ({d})")
    }
}

impl From<tonic::Status> for ApiError {
    /// A status the transport produced (a reset stream, a decode error).
    fn from(s: tonic::Status) -> Self {
        ApiError::Transport(s.message().to_owned())
    }
}

/// Maps an error to the status a client sees. Internal details of storage
/// failures are logged, not returned.
pub fn to_status(e: ApiError) -> Status {
    let code = match &e {
        ApiError::NoSandboxNamed
        | ApiError::AmbiguousDriver { .. }
        | ApiError::FirstMessage { .. }
        | ApiError::BadField(_)
        | ApiError::Name(_)
        | ApiError::Policy(_)
        | ApiError::Spec(_) => Code::InvalidArgument,
        ApiError::PolicyRevision { .. } => Code::Aborted,
        ApiError::SandboxNotFound { .. }
        | ApiError::PluginNotFound { .. }
        | ApiError::UnknownRelay { .. } => Code::NotFound,
        ApiError::NameTaken { .. } => Code::AlreadyExists,
        ApiError::NoDriverLoaded
        | ApiError::DriverNotLoaded { .. }
        | ApiError::PluginInUse { .. }
        | ApiError::NotReady { .. }
        | ApiError::Stopped { .. }
        | ApiError::WrongPhase { .. }
        | ApiError::NoSshServer { .. }
        | ApiError::NoSshHostKey { .. }
        | ApiError::RelayRefused { .. }
        | ApiError::MainExists { .. } => Code::FailedPrecondition,
        ApiError::Logs(_) => Code::Internal,
        ApiError::Transfer { kind, .. } => match kind {
            openshell_files::FailureKind::NotFound => Code::NotFound,
            openshell_files::FailureKind::Exists => Code::AlreadyExists,
            openshell_files::FailureKind::Limit => Code::ResourceExhausted,
            openshell_files::FailureKind::BadRequest => Code::InvalidArgument,
            openshell_files::FailureKind::Other => Code::FailedPrecondition,
        },
        ApiError::TooLarge { .. }
        | ApiError::RelaysWaiting { .. }
        | ApiError::NoFreeUidSlot { .. }
        | ApiError::DiskReserve { .. } => Code::ResourceExhausted,
        ApiError::FirstMessageTimeout { .. } | ApiError::RelayIdle { .. } => Code::DeadlineExceeded,
        ApiError::NoFreeName
        | ApiError::CreateInFlight
        | ApiError::SupervisorNotConnected { .. }
        | ApiError::NoEgressSession
        | ApiError::RelayNotOpened { .. }
        | ApiError::SupervisorGone { .. }
        | ApiError::ShuttingDown
        | ApiError::Transport(_) => Code::Unavailable,
        ApiError::Busy {
            message,
            retry_after,
        } => {
            let mut status = Status::resource_exhausted(message.clone());
            // A machine-readable hint next to the human one in the message.
            if let Ok(v) = retry_after.as_millis().to_string().parse() {
                status.metadata_mut().insert("retry-after-ms", v);
            }
            return status;
        }
        ApiError::Store(s) => match s {
            StoreError::NameTaken { .. } | StoreError::RequestIdTaken { .. } => Code::AlreadyExists,
            StoreError::NotFound { .. } => Code::NotFound,
            // The runtime retries both; reaching a client means it gave up.
            StoreError::Conflict { .. } | StoreError::SlotTaken { .. } => Code::Aborted,
            StoreError::UnsupportedUrl { .. }
            | StoreError::Connect { .. }
            | StoreError::Migrate { .. }
            | StoreError::Query { .. }
            | StoreError::Corrupt { .. } => {
                tracing::error!("store failure: {s:?}");
                return Status::internal("the gateway's database failed; see the gateway log");
            }
        },
        ApiError::Plugin(p) => match p {
            PluginError::NotFound { .. } => Code::NotFound,
            PluginError::TooLarge { .. } => Code::ResourceExhausted,
            PluginError::Grant(GrantError::NotGranted { .. }) => Code::FailedPrecondition,
            PluginError::Grant(_)
            | PluginError::InvalidComponent { .. }
            | PluginError::WrongWorld { .. }
            | PluginError::Describe(_) => Code::InvalidArgument,
            PluginError::Io { .. } | PluginError::Engine { .. } | PluginError::Disk { .. } => {
                tracing::error!("plugin host failure: {p}");
                Code::Internal
            }
        },
        ApiError::NoImageStore | ApiError::ImageInUse { .. } => Code::FailedPrecondition,
        ApiError::ImageUpload(e) => match e.raw_os_error() {
            Some(libc_enospc)
                if libc_enospc == nix::libc::ENOSPC || libc_enospc == nix::libc::EDQUOT =>
            {
                Code::ResourceExhausted
            }
            _ => Code::Internal,
        },
        ApiError::ImageNotFound { .. } => Code::NotFound,
        ApiError::Image(i) => image_code(i),
        ApiError::Driver { source, .. } => match source {
            CallError::Invalid(_) => Code::InvalidArgument,
            CallError::Unsupported(_) | CallError::Failed { .. } => Code::FailedPrecondition,
            CallError::Trapped { .. }
            | CallError::TimedOut { .. }
            | CallError::StateTooLarge { .. } => Code::Internal,
        },
    };
    Status::new(code, e.to_string())
}

/// [`to_status`], with a host path the client should not learn (where an
/// upload was staged) named as `shown` instead.
pub fn to_status_naming(e: ApiError, path: &std::path::Path, shown: &str) -> Status {
    let status = to_status(e);
    let message = status.message().replace(&path.display().to_string(), shown);
    Status::new(status.code(), message)
}

/// Image store failures by meaning: the caller's input, the registry, the
/// image itself, the host.
fn image_code(e: &ImageError) -> Code {
    match e {
        ImageError::InvalidReference { .. }
        | ImageError::InvalidDigest { .. }
        | ImageError::NotFound { .. }
        | ImageError::NameRequired { .. }
        | ImageError::AmbiguousImport { .. } => Code::InvalidArgument,
        ImageError::NotInRegistry { .. } => Code::NotFound,
        ImageError::Unreachable { .. } | ImageError::StoreBusy { .. } => Code::Unavailable,
        ImageError::Unauthorized { .. } => Code::PermissionDenied,
        ImageError::InsecureRefused { .. }
        | ImageError::Registry { .. }
        | ImageError::NoPlatform { .. }
        | ImageError::DigestMismatch { .. }
        | ImageError::SizeMismatch { .. }
        | ImageError::LayerEscapes { .. }
        | ImageError::UidOutOfRange { .. }
        | ImageError::LayerInvalidEntry { .. }
        | ImageError::LayerUnreadable { .. }
        | ImageError::ArchiveUnreadable { .. }
        | ImageError::InvalidJson { .. }
        | ImageError::InvalidImage { .. }
        | ImageError::Unsupported { .. }
        | ImageError::DiskBuild { .. } => Code::FailedPrecondition,
        ImageError::TooLarge { .. } | ImageError::DiskFull { .. } => Code::ResourceExhausted,
        ImageError::InsecureStore { .. } | ImageError::NotRoot | ImageError::Io { .. } => {
            tracing::error!("image store failure: {e}");
            Code::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_client_strings_are_cut_in_messages() {
        let e = ApiError::SandboxNotFound {
            name: "x".repeat(1 << 20),
        };
        let s = to_status(e);
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < 400, "{}", s.message().len());
        assert!(s.message().contains("1048576 bytes"));
    }

    #[test]
    fn a_stop_or_start_in_the_wrong_phase_is_a_failed_precondition_saying_what_to_do() {
        let wrong = |phase| {
            to_status(ApiError::WrongPhase {
                name: "w".into(),
                phase,
                action: "stopped",
            })
        };
        let s = wrong(Phase::Provisioning);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.message()
                .contains("is Provisioning, so it cannot be stopped"),
            "{}",
            s.message()
        );
        assert!(
            s.message().contains("wait until it is Ready"),
            "{}",
            s.message()
        );
        assert!(wrong(Phase::Error).message().contains("delete it"));
        let s = to_status(ApiError::Stopped { name: "w".into() });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(
            s.message().contains("`openshell sandbox start w`"),
            "{}",
            s.message()
        );
    }

    #[test]
    fn busy_carries_a_retry_hint() {
        let s = to_status(ApiError::Busy {
            message: "full".into(),
            retry_after: Duration::from_millis(500),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "500");
    }
}
