//! Test driver: the well-behaved plugin. `create` writes `hello.txt`, logs,
//! and reports progress; `fixture-echo-v2` is the same code with other words,
//! for hot-reload tests. The code is in `echo.rs`, shared by both.

/// What `create` says, followed by the sandbox's name.
const GREETING: &str = "echo says hi to";
/// What `create` returns as the driver's state.
const STATE: &[u8] = b"echo-v1";

mod echo;
