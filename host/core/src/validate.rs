//! Validation of what users send, with no I/O. Each error says what to fix.

use std::collections::BTreeMap;

use crate::sandbox::Resources;

pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_VALUE_LEN: usize = 32 * 1024;
pub const MAX_REQUEST_ID_LEN: usize = 128;
pub const MAX_VCPUS: u32 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_PROCESSES: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("environment variable name {key} is invalid: use [A-Za-z_][A-Za-z0-9_]*")]
    EnvKey { key: String },
    #[error("environment variable {key} is {len} bytes; the limit is {MAX_ENV_VALUE_LEN}")]
    EnvValueTooLong { key: String, len: usize },
    #[error("environment variable {key} contains a NUL byte")]
    EnvValueNul { key: String },
    #[error("{count} environment variables given; the limit is {MAX_ENV_VARS}")]
    TooManyEnv { count: usize },
    #[error("{field} = {value} is out of range: {range}")]
    Resource {
        field: &'static str,
        value: u64,
        range: &'static str,
    },
    #[error(
        "request_id must be 1..={MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:-]; got {len} characters"
    )]
    RequestId { len: usize },
    #[error("driver name {name} is invalid: use lowercase letters, digits and '-', up to 63")]
    DriverName { name: String },
    #[error(
        "disk_gib = {asked} is more than this gateway's whole sandbox disk ({pool_gib} GiB): ask for 1 to {pool_gib} GiB, or 0 (unset) for its default of {default_gib} GiB"
    )]
    DiskTooLarge {
        asked: u32,
        pool_gib: u64,
        default_gib: u32,
    },
    #[error(
        "disk_gib = {asked}, but this gateway has no sandbox disk (it was started with --sandbox-disk-gib 0, or its log says why), so it cannot bound a sandbox's disk: leave disk_gib 0 (unset)"
    )]
    NoSandboxDisk { asked: u32 },
    #[error(
        "{field} = {secs} s is longer than the longest lifetime ({} days): ask for at most {}s (366d), or leave it 0 (unset) for none",
        crate::lifetime::MAX_SECS / 86_400,
        crate::lifetime::MAX_SECS
    )]
    LifetimeTooLong { field: &'static str, secs: u64 },
}

/// A sandbox's lifetimes: each at most [`crate::lifetime::MAX_SECS`].
pub fn lifetime(l: &crate::sandbox::Lifetime) -> Result<(), SpecError> {
    for (field, secs) in [
        ("ttl_seconds", l.ttl_secs),
        ("idle_timeout_seconds", l.idle_timeout_secs),
    ] {
        if secs > crate::lifetime::MAX_SECS {
            return Err(SpecError::LifetimeTooLong { field, secs });
        }
    }
    Ok(())
}

/// The sandbox disk as a create sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSizes {
    /// What the whole sandbox disk holds, in GiB: no sandbox may ask for
    /// more.
    pub pool_gib: u64,
    /// What a sandbox that asks for no size gets.
    pub default_gib: u32,
}

/// The disk size a sandbox that asked for `asked` GiB (0: the default) is
/// stored with, on a gateway whose sandbox disk is `disk` (`None`: it has
/// none, so it has no size to give, and 0 is stored).
pub fn disk_gib(asked: u32, disk: Option<DiskSizes>) -> Result<u32, SpecError> {
    match disk {
        None if asked == 0 => Ok(0),
        None => Err(SpecError::NoSandboxDisk { asked }),
        Some(d) if asked == 0 => Ok(d.default_gib),
        Some(d) if u64::from(asked) <= d.pool_gib => Ok(asked),
        Some(d) => Err(SpecError::DiskTooLarge {
            asked,
            pool_gib: d.pool_gib,
            default_gib: d.default_gib,
        }),
    }
}

/// Environment names the gateway sets for the supervisor (endpoint, sandbox
/// id, secret); drivers refuse them in a sandbox's spec so a user can neither
/// set nor override them.
pub const RESERVED_ENV_PREFIX: &str = "OPENSHELL_";

/// `[A-Za-z_][A-Za-z0-9_]*`, the portable shell variable name. This is the
/// one environment-key grammar: the gateway, the CLI, the plugin host, the
/// supervisor and the drivers (which build this crate for wasm) all call it.
pub fn is_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether a name is the gateway's to set (see [`RESERVED_ENV_PREFIX`]).
pub fn is_reserved_env_key(key: &str) -> bool {
    key.starts_with(RESERVED_ENV_PREFIX)
}

/// One variable: a grammatical name and a value that fits and has no NUL.
pub fn env_var(key: &str, value: &str) -> Result<(), SpecError> {
    if !is_env_key(key) {
        return Err(SpecError::EnvKey {
            key: crate::quote::excerpt(key, 80),
        });
    }
    if value.len() > MAX_ENV_VALUE_LEN {
        return Err(SpecError::EnvValueTooLong {
            key: key.to_owned(),
            len: value.len(),
        });
    }
    if value.contains('\0') {
        return Err(SpecError::EnvValueNul {
            key: key.to_owned(),
        });
    }
    Ok(())
}

pub fn environment(env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    if env.len() > MAX_ENV_VARS {
        return Err(SpecError::TooManyEnv { count: env.len() });
    }
    env.iter().try_for_each(|(k, v)| env_var(k, v))
}

pub fn resources(r: &Resources) -> Result<(), SpecError> {
    if r.vcpus > MAX_VCPUS {
        return Err(SpecError::Resource {
            field: "vcpus",
            value: r.vcpus.into(),
            range: "0 (driver default) to 64",
        });
    }
    if r.memory_mib != 0 && !(16..=MAX_MEMORY_MIB).contains(&r.memory_mib) {
        return Err(SpecError::Resource {
            field: "memory_mib",
            value: r.memory_mib,
            range: "0 (driver default) or 16 to 1048576",
        });
    }
    if r.max_processes > MAX_PROCESSES {
        return Err(SpecError::Resource {
            field: "max_processes",
            value: r.max_processes.into(),
            range: "0 (driver default) to 1048576",
        });
    }
    Ok(())
}

pub fn request_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::RequestId {
            len: id.chars().count(),
        })
    }
}

/// Driver (plugin) names share the sandbox-name grammar.
pub fn driver_name(name: &str) -> Result<(), SpecError> {
    crate::name::SandboxName::parse(name)
        .map(|_| ())
        .map_err(|_| SpecError::DriverName {
            name: crate::quote::excerpt(name, 80),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_longer_than_366_days_are_refused_with_the_longest_allowed() {
        use crate::sandbox::Lifetime;
        let ok = Lifetime {
            ttl_secs: crate::lifetime::MAX_SECS,
            idle_timeout_secs: 30,
        };
        assert!(lifetime(&ok).is_ok());
        assert!(lifetime(&Lifetime::default()).is_ok());
        let long = Lifetime {
            idle_timeout_secs: crate::lifetime::MAX_SECS + 1,
            ..ok
        };
        let msg = lifetime(&long).unwrap_err().to_string();
        assert!(msg.contains("idle_timeout_seconds"), "{msg}");
        assert!(msg.contains("366d"), "{msg}");
    }

    #[test]
    fn env_keys_follow_the_shell_grammar() {
        for ok in ["A", "_x", "PATH", "a1_B2"] {
            assert!(is_env_key(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "é"] {
            assert!(!is_env_key(bad), "{bad}");
        }
    }

    const ENV_KEY_TABLE: [(&str, bool); 12] = [
        ("A", true),
        ("_x", true),
        ("PATH", true),
        ("a1_B2", true),
        ("OPENSHELL_SANDBOX_ID", true),
        ("", false),
        ("1A", false),
        ("A-B", false),
        ("A=B", false),
        ("A B", false),
        ("A\0", false),
        ("é", false),
    ];

    #[test]
    fn the_env_key_table_matches_the_grammar() {
        for (key, ok) in ENV_KEY_TABLE {
            assert_eq!(is_env_key(key), ok, "{key:?}");
            assert_eq!(env_var(key, "v").is_ok(), ok, "{key:?}");
        }
    }

    #[test]
    fn only_openshell_names_are_reserved() {
        assert!(is_reserved_env_key("OPENSHELL_SANDBOX_SECRET"));
        assert!(is_reserved_env_key("OPENSHELL_"));
        assert!(!is_reserved_env_key("OPENSHELL"));
        assert!(!is_reserved_env_key("openshell_x"));
        assert!(!is_reserved_env_key("MY_OPENSHELL_X"));
    }

    #[test]
    fn a_value_with_nul_or_over_the_limit_is_rejected_by_name() {
        assert_eq!(
            env_var("A", "x\0y"),
            Err(SpecError::EnvValueNul { key: "A".into() })
        );
        let long = "x".repeat(MAX_ENV_VALUE_LEN + 1);
        assert!(matches!(
            env_var("B", &long),
            Err(SpecError::EnvValueTooLong { key, .. }) if key == "B"
        ));
        assert_eq!(env_var("C", &"x".repeat(MAX_ENV_VALUE_LEN)), Ok(()));
    }

    #[test]
    fn resources_outside_their_range_are_rejected() {
        assert!(resources(&Resources::default()).is_ok());
        assert!(
            resources(&Resources {
                vcpus: 65,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            resources(&Resources {
                memory_mib: 8,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn a_disk_size_is_the_asked_one_or_the_default_and_never_more_than_the_disk() {
        let disk = Some(DiskSizes {
            pool_gib: 64,
            default_gib: 8,
        });
        assert_eq!(disk_gib(0, disk), Ok(8));
        assert_eq!(disk_gib(1, disk), Ok(1));
        assert_eq!(disk_gib(64, disk), Ok(64));
        let err = disk_gib(65, disk).unwrap_err();
        assert!(matches!(err, SpecError::DiskTooLarge { asked: 65, .. }));
        assert!(err.to_string().contains("ask for 1 to 64 GiB"), "{err}");
        assert!(disk_gib(u32::MAX, disk).is_err());
        // Without a sandbox disk there is nothing to size.
        assert_eq!(disk_gib(0, None), Ok(0));
        let err = disk_gib(1, None).unwrap_err();
        assert!(err.to_string().contains("no sandbox disk"), "{err}");
    }

    #[test]
    fn request_ids_are_short_tokens() {
        assert!(request_id("abc-123:retry.1").is_ok());
        assert!(request_id("").is_err());
        assert!(request_id("a b").is_err());
        assert!(request_id(&"a".repeat(129)).is_err());
    }

    use proptest::prelude::*;

    fn arb_env() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(
            "\\PC{0,12}|[A-Za-z_][A-Za-z0-9_]{0,10}",
            "\\PC{0,20}|.*\0.*",
            0..8,
        )
    }

    proptest! {
        /// Fuzzing (issue 8): accepted environments follow the grammar.
        #[test]
        fn accepted_environments_follow_the_grammar(env in arb_env()) {
            match environment(&env) {
                Ok(()) => {
                    prop_assert!(env.len() <= MAX_ENV_VARS);
                    for (k, v) in &env {
                        prop_assert!(!k.is_empty());
                        prop_assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
                        prop_assert!(!k.as_bytes()[0].is_ascii_digit());
                        prop_assert!(v.len() <= MAX_ENV_VALUE_LEN && !v.contains('\0'));
                    }
                }
                Err(e) => prop_assert!(e.to_string().len() < 400, "{e}"),
            }
        }

        #[test]
        fn accepted_resources_are_in_range(vcpus: u32, memory_mib: u64, max_processes: u32) {
            let r = Resources { vcpus, memory_mib, max_processes, disk_gib: 0 };
            if resources(&r).is_ok() {
                prop_assert!(vcpus <= MAX_VCPUS && max_processes <= MAX_PROCESSES);
                prop_assert!(memory_mib == 0 || (16..=MAX_MEMORY_MIB).contains(&memory_mib));
            }
        }

        #[test]
        fn accepted_request_ids_are_short_tokens(id in "\\PC{0,140}|[A-Za-z0-9._:-]{0,140}") {
            if request_id(&id).is_ok() {
                prop_assert!((1..=MAX_REQUEST_ID_LEN).contains(&id.len()));
                prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b)));
            }
        }

        #[test]
        fn driver_name_errors_are_bounded(name in "\\PC{0,300}") {
            if let Err(e) = driver_name(&name) {
                prop_assert!(e.to_string().chars().count() < 250);
            }
        }
    }
}
