//! What every driver shares. The `compute-driver` bindings are generated
//! here, once, so the types below are the same types in every driver; each
//! driver implements [`exports::openshell::compute::driver::Guest`] and
//! exports it with this crate's [`export!`] macro:
//!
//! ```text
//! openshell_driver_common::export!(ProcessDriver);
//! ```
//!
//! Besides the bindings: how host events become driver events
//! ([`driver_event`]), how a capability error is reported ([`failed`]), and
//! the environment rules every driver applies to a spec ([`check_env_var`]).
//! The fixtures in `test-programs/` keep their own bindings: each is meant
//! to be a small, self-contained guest.

wit_bindgen::generate!({
    path: "../../wit",
    world: "compute-driver",
    additional_derives: [PartialEq],
    // Drivers call `openshell_driver_common::export!(Type)`, which refers
    // back to the types generated here.
    pub_export_macro: true,
    default_bindings_module: "openshell_driver_common",
});

use openshell::compute::types::{CapError, DriverError, DriverEvent, Failure, HostEvent};
use openshell_core::validate;

pub use validate::RESERVED_ENV_PREFIX;

/// Turns what the host saw about the sandbox's process (the supervisor, or
/// the VM running it) into what the driver reports.
pub fn driver_event(event: HostEvent) -> DriverEvent {
    match event {
        HostEvent::ProcessExited(status) => DriverEvent::Exited(status),
        HostEvent::PollFailed(message) => DriverEvent::Failed(Failure {
            reason: "ProcessPollFailed".into(),
            message,
        }),
    }
}

/// A capability error as text: its kind, then the host's message.
pub fn describe_cap_error(error: &CapError) -> String {
    let (kind, message) = match error {
        CapError::AccessDenied(m) => ("access denied", m),
        CapError::Invalid(m) => ("invalid", m),
        CapError::Unavailable(m) => ("unavailable", m),
        CapError::Timeout(m) => ("timed out", m),
        CapError::Failed(m) => ("failed", m),
    };
    format!("{kind}: {message}")
}

/// A failed capability call as the driver's failure: a machine-readable
/// `reason` (e.g. `SpawnFailed`), and what the driver was `doing`.
pub fn failed(reason: &str, doing: &str, error: &CapError) -> DriverError {
    DriverError::Failed(Failure {
        reason: reason.into(),
        message: format!("{doing}: {}", describe_cap_error(error)),
    })
}

/// One variable of a spec's environment: not one the gateway sets
/// ([`RESERVED_ENV_PREFIX`]), and valid by the core's one grammar.
pub fn check_env_var(name: &str, value: &str) -> Result<(), DriverError> {
    if validate::is_reserved_env_key(name) {
        return Err(DriverError::Invalid(format!(
            "environment variable {name} is reserved: names starting with \
             {RESERVED_ENV_PREFIX} are set by the gateway; rename or remove it"
        )));
    }
    validate::env_var(name, value).map_err(|e| DriverError::Invalid(e.to_string()))
}

/// The sandbox's image, by the digest the gateway stored at create (the
/// reference only if no digest was recorded).
pub fn prepare_image(
    asked: &openshell::compute::types::ImageRef,
) -> Result<openshell::compute::image::PreparedImage, DriverError> {
    use openshell::compute::image;
    let digest = if asked.digest.is_empty() {
        image::resolve(&asked.reference)
            .map_err(|e| failed("ImageUnavailable", "resolving the image", &e))?
            .digest
    } else {
        asked.digest.clone()
    };
    image::prepare(&digest).map_err(|e| failed("ImageUnavailable", "preparing the image", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_events_map_to_exited_or_poll_failed() {
        assert_eq!(
            driver_event(HostEvent::ProcessExited(137)),
            DriverEvent::Exited(137)
        );
        assert_eq!(
            driver_event(HostEvent::PollFailed("gone".into())),
            DriverEvent::Failed(Failure {
                reason: "ProcessPollFailed".into(),
                message: "gone".into()
            })
        );
    }

    #[test]
    fn a_failed_call_names_the_reason_what_was_being_done_and_the_kind() {
        let e = failed(
            "SpawnFailed",
            "spawning the supervisor",
            &CapError::AccessDenied("no grant".into()),
        );
        assert_eq!(
            e,
            DriverError::Failed(Failure {
                reason: "SpawnFailed".into(),
                message: "spawning the supervisor: access denied: no grant".into(),
            })
        );
        assert_eq!(
            describe_cap_error(&CapError::Timeout("5 s".into())),
            "timed out: 5 s"
        );
    }

    /// The keys the core's grammar table checks, seen from a driver: the
    /// same verdicts, except that the gateway's own names are reserved.
    #[test]
    fn drivers_agree_with_the_core_grammar_and_reserve_openshell_names() {
        let table = [
            ("A", true),
            ("_x", true),
            ("PATH", true),
            ("a1_B2", true),
            ("", false),
            ("1A", false),
            ("A-B", false),
            ("A=B", false),
            ("A B", false),
            ("A\0", false),
            ("é", false),
        ];
        for (key, ok) in table {
            assert_eq!(check_env_var(key, "v").is_ok(), ok, "{key:?}");
            assert_eq!(validate::is_env_key(key), ok, "{key:?}");
        }
        assert!(validate::is_env_key("OPENSHELL_SANDBOX_ID"));
        assert!(matches!(
            check_env_var("OPENSHELL_SANDBOX_ID", "v"),
            Err(DriverError::Invalid(m)) if m.contains("reserved")
        ));
        assert!(matches!(
            check_env_var("A", "x\0y"),
            Err(DriverError::Invalid(m)) if m.contains("NUL")
        ));
    }
}
