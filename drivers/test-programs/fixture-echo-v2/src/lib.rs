//! Test driver: `fixture-echo` with other words and state, for hot-reload
//! tests. Shares `fixture-echo/src/echo.rs`.

/// What `create` says, followed by the sandbox's name.
const GREETING: &str = "echo v2 says hi to";
/// What `create` returns as the driver's state.
const STATE: &[u8] = b"echo-v2";

#[path = "../../fixture-echo/src/echo.rs"]
mod echo;
