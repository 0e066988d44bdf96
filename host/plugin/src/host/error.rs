//! What can go wrong loading a plugin ([`PluginError`]) or calling it
//! ([`CallError`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::grants::GrantError;
use crate::host::{MAX_COMPONENT, MAX_STATE};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot set up the sandbox disk: {source}")]
    Disk {
        #[source]
        source: crate::disk::DiskError,
    },
    #[error("the component is {len} bytes; the limit is {MAX_COMPONENT}")]
    TooLarge { len: usize },
    #[error("not a valid WebAssembly component: {source:#}")]
    InvalidComponent {
        #[source]
        source: wasmtime::Error,
    },
    #[error(
        "the component does not implement the openshell:compute@{world} compute-driver world: {source:#}", world = crate::grants::WORLD_VERSION
    )]
    WrongWorld {
        #[source]
        source: wasmtime::Error,
    },
    #[error(transparent)]
    Grant(#[from] GrantError),
    #[error("the component's describe() failed: {0}")]
    Describe(#[source] CallError),
    #[error("plugin {name:?} is not loaded")]
    NotFound { name: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the WebAssembly engine: {source:#}")]
    Engine {
        #[source]
        source: wasmtime::Error,
    },
}

/// Why a call into a plugin did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The driver says the request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The driver cannot honour the request here.
    #[error("{0}")]
    Unsupported(String),
    /// The driver tried and failed.
    #[error("{reason}: {message}")]
    Failed { reason: String, message: String },
    /// The plugin trapped (a bug, a memory blow-up, a runaway loop).
    #[error("plugin {plugin} trapped: {message}")]
    Trapped { plugin: String, message: String },
    /// The call ran past its deadline and was abandoned.
    #[error("plugin {plugin} did not answer within {after:?}")]
    TimedOut { plugin: String, after: Duration },
    #[error("plugin {plugin} returned {len} bytes of state; the limit is {MAX_STATE}")]
    StateTooLarge { plugin: String, len: usize },
}

impl CallError {
    /// The reason the sandbox's conditions show for this failure.
    pub fn reason(&self) -> &str {
        match self {
            CallError::Invalid(_) | CallError::Unsupported(_) => "DriverRejected",
            CallError::Failed { reason, .. } => reason,
            CallError::Trapped { .. } | CallError::StateTooLarge { .. } => "DriverFailed",
            CallError::TimedOut { .. } => "DriverTimedOut",
        }
    }
}
