//! What every streaming RPC does first: read the message that opens it,
//! under a deadline, and name what was expected when it is missing.

use std::time::Duration;

use tonic::{Status, Streaming};

use crate::error::{ApiError, to_status};

/// The first message of `inbound`, which must arrive within `within`.
/// `rpc` and `expected` name it in the error when the stream ends first.
pub async fn first_message<T>(
    inbound: &mut Streaming<T>,
    rpc: &'static str,
    expected: &'static str,
    within: Duration,
) -> Result<T, Status> {
    match tokio::time::timeout(within, inbound.message()).await {
        Err(_) => Err(to_status(ApiError::FirstMessageTimeout {
            expected,
            within,
        })),
        Ok(Err(s)) => Err(to_status(s.into())),
        Ok(Ok(None)) => Err(to_status(ApiError::FirstMessage { rpc, expected })),
        Ok(Ok(Some(m))) => Ok(m),
    }
}
