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
    #[error("sandbox {name}'s supervisor is not connected; retry shortly")]
    SupervisorNotConnected { name: String },
    #[error("sandbox {name}'s supervisor did not open the relay in time")]
    RelayNotOpened { name: String },
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
        | ApiError::Spec(_) => Code::InvalidArgument,
        ApiError::SandboxNotFound { .. }
        | ApiError::PluginNotFound { .. }
        | ApiError::UnknownRelay { .. } => Code::NotFound,
        ApiError::NameTaken { .. } => Code::AlreadyExists,
        ApiError::NoDriverLoaded
        | ApiError::DriverNotLoaded { .. }
        | ApiError::PluginInUse { .. }
        | ApiError::NotReady { .. }
        | ApiError::NoSshServer { .. }
        | ApiError::NoSshHostKey { .. } => Code::FailedPrecondition,
        ApiError::TooLarge { .. }
        | ApiError::RelaysWaiting { .. }
        | ApiError::NoFreeUidSlot { .. } => Code::ResourceExhausted,
        ApiError::FirstMessageTimeout { .. } | ApiError::RelayIdle { .. } => Code::DeadlineExceeded,
        ApiError::NoFreeName
        | ApiError::CreateInFlight
        | ApiError::SupervisorNotConnected { .. }
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
        | ImageError::Unsupported { .. } => Code::FailedPrecondition,
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
    fn busy_carries_a_retry_hint() {
        let s = to_status(ApiError::Busy {
            message: "full".into(),
            retry_after: Duration::from_millis(500),
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "500");
    }
}
