//! Sandbox network policy: parse the YAML document, validate it, and decide
//! each outbound TCP connection. Pure code: no I/O, no clock, no async.
//!
//! The model, default deny:
//! - A [`Policy`] is a map of rules, keyed by a stable identity and tried in
//!   key order. A rule lists endpoints (a host name or pattern, or an IP,
//!   with ports and optional `allowed_ips`) and, optionally, the binaries it
//!   admits (absent: any). No rule, no connection.
//! - The gateway asks three things: may this name be resolved at all
//!   ([`Policy::allows_name`], its DNS stub answers NXDOMAIN otherwise);
//!   which (CIDR, port) pairs may the sandbox's packet filter pass
//!   ([`Policy::address_allow_set`]); and, for every connection, may it go
//!   and to which of the resolved addresses ([`Policy::decide`]).
//! - Address guards apply whatever the rules say: metadata and link-local
//!   addresses are never dialled, private ones only for exact hosts or via
//!   `allowed_ips`, loopback only via `allowed_ips` ([`classify`]).
//!
//! The schema is the incumbent's (NVIDIA OpenShell,
//! `docs/reference/policy-schema.mdx` upstream), so its users can bring their
//! files; fields we do not implement yet are refused by name, never ignored.
//! We differ on purpose twice: `binaries` may be omitted (any binary), and
//! loopback is reachable when `allowed_ips` names it (so tests can reach
//! servers on 127.0.0.1).
//!
//! Start at [`Policy::parse`] (`load.rs`) and [`Policy::decide`]
//! (`decide.rs`). The supervisor inside the sandbox never calls this crate:
//! the policy is enforced outside the sandbox, by the gateway.

mod addr;
mod binary;
mod decide;
mod error;
mod host;
mod load;
mod policy;
mod schema;

#[cfg(test)]
mod proptests;

pub use addr::{AddrClass, classify};
pub use decide::{Decision, DenyReason, Request, Target};
pub use error::{PolicyError, PolicyErrorKind};
pub use host::HostError;
pub use policy::Policy;
