//! The one place domain errors become gRPC statuses.

use openshell_core::{NameError, SpecError};
use openshell_plugin::{CallError, GrantError, PluginError};
use openshell_store::StoreError;
use tonic::{Code, Status};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    /// Over a capacity limit; the client should retry after `retry_after`.
    #[error("{message}")]
    Busy {
        message: String,
        retry_after: std::time::Duration,
    },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("driver {driver}: {source}")]
    Driver {
        driver: String,
        #[source]
        source: CallError,
    },
}

/// Maps an error to the status a client sees. Internal details of storage
/// failures are logged, not returned.
pub fn to_status(e: ApiError) -> Status {
    let code = match &e {
        ApiError::InvalidArgument(_) | ApiError::Name(_) | ApiError::Spec(_) => {
            Code::InvalidArgument
        }
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::AlreadyExists(_) => Code::AlreadyExists,
        ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
        ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
        ApiError::Unavailable(_) => Code::Unavailable,
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
            StoreError::Conflict { .. } => Code::Aborted,
            _ => {
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
            PluginError::Io { .. } | PluginError::Engine { .. } => {
                tracing::error!("plugin host failure: {p}");
                Code::Internal
            }
        },
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
