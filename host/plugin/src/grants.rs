//! Capability grants: which host interfaces a plugin may import.
//!
//! Default deny. A component declares what it needs through its imports; the
//! operator grants capabilities by name; loading fails, naming the first
//! missing grant, unless every import is granted. WASI imports are always
//! linked but backed by an empty context (no files, env, network or args),
//! so they grant nothing. Pure functions, no I/O.

use std::fmt;

/// The WIT package every capability interface lives in.
pub const PACKAGE: &str = "openshell:compute";

/// The version of `wit/world.wit` this host provides; a component built
/// against another is refused at load with [`GrantError::OtherWorld`].
pub const WORLD_VERSION: &str = "0.3.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    Log,
    Files,
    Image,
    Process,
    Network,
    Rootfs,
    Vm,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Log,
        Capability::Files,
        Capability::Image,
        Capability::Process,
        Capability::Network,
        Capability::Rootfs,
        Capability::Vm,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Files => "files",
            Capability::Image => "image",
            Capability::Process => "process",
            Capability::Network => "network",
            Capability::Rootfs => "rootfs",
            Capability::Vm => "vm",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, GrantError> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == raw)
            .ok_or_else(|| GrantError::UnknownCapability {
                name: openshell_core::quote::excerpt(raw, 64),
            })
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error(
        "unknown capability {name}: grantable capabilities are log, files, image, process, network, rootfs, vm"
    )]
    UnknownCapability { name: String },
    #[error(
        "the component imports capability '{capability}' ({import}) which is not granted; load it with --grant {capability} if you trust it"
    )]
    NotGranted {
        capability: Capability,
        import: String,
    },
    #[error(
        "the component imports {import}, which this host does not provide; a driver may import only openshell:compute@{WORLD_VERSION} capabilities and WASI"
    )]
    UnknownImport { import: String },
    #[error(
        "the component was built against openshell:compute@{version} ({name}); this gateway provides openshell:compute@{WORLD_VERSION}: rebuild the plugin against the gateway's wit/world.wit"
    )]
    OtherWorld { name: String, version: String },
}

/// What one import of a component is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Import {
    /// A capability interface (`openshell:compute/<cap>@<ver>`).
    Capability(Capability),
    /// The shared types interface: no authority.
    Types,
    /// A WASI interface, linked against an empty context.
    Wasi,
}

/// Classifies an import name such as `openshell:compute/files@0.1.0`.
pub fn classify(import: &str) -> Result<Import, GrantError> {
    if import.starts_with("wasi:") {
        return Ok(Import::Wasi);
    }
    let unknown = || GrantError::UnknownImport {
        import: openshell_core::quote::excerpt(import, 120),
    };
    let rest = import
        .strip_prefix(PACKAGE)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(unknown)?;
    let (iface, version) = rest.split_once('@').ok_or_else(unknown)?;
    check_version(import, version)?;
    if iface == "types" {
        return Ok(Import::Types);
    }
    Capability::parse(iface)
        .map(Import::Capability)
        .map_err(|_| unknown())
}

/// Refuses an interface of another version of the world, naming it.
fn check_version(name: &str, version: &str) -> Result<(), GrantError> {
    if version == WORLD_VERSION {
        Ok(())
    } else {
        Err(GrantError::OtherWorld {
            name: name.chars().take(120).collect(),
            version: version.chars().take(32).collect(),
        })
    }
}

/// Refuses a component whose exports come from another version of the
/// world (a driver that imports nothing versioned is caught here).
pub fn check_exports<'a>(exports: impl IntoIterator<Item = &'a str>) -> Result<(), GrantError> {
    for export in exports {
        let versioned = export
            .strip_prefix(PACKAGE)
            .and_then(|r| r.strip_prefix('/'))
            .and_then(|r| r.split_once('@'));
        if let Some((_, version)) = versioned {
            check_version(export, version)?;
        }
    }
    Ok(())
}

/// Checks every import against the grants; returns the capabilities the
/// component imports (sorted, deduplicated).
pub fn check<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    granted: &[Capability],
) -> Result<Vec<Capability>, GrantError> {
    let mut used = Vec::new();
    for import in imports {
        if let Import::Capability(cap) = classify(import)? {
            if !granted.contains(&cap) {
                return Err(GrantError::NotGranted {
                    capability: cap,
                    import: import.to_owned(),
                });
            }
            used.push(cap);
        }
    }
    used.sort();
    used.dedup();
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_round_trips_through_its_name() {
        for c in Capability::ALL {
            assert_eq!(Capability::parse(c.as_str()), Ok(c));
        }
        assert!(Capability::parse("root").is_err());
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let err = check(["openshell:compute/vm@0.3.0"], &[]).unwrap_err();
        assert_eq!(
            err,
            GrantError::NotGranted {
                capability: Capability::Vm,
                import: "openshell:compute/vm@0.3.0".into()
            }
        );
        assert!(err.to_string().contains("--grant vm"));
    }

    #[test]
    fn granted_imports_pass_and_are_reported() {
        let used = check(
            [
                "wasi:cli/environment@0.2.6",
                "openshell:compute/types@0.3.0",
                "openshell:compute/log@0.3.0",
                "openshell:compute/files@0.3.0",
                "openshell:compute/log@0.3.0",
            ],
            &[Capability::Files, Capability::Log, Capability::Vm],
        )
        .unwrap();
        assert_eq!(used, vec![Capability::Log, Capability::Files]);
    }

    #[test]
    fn foreign_and_future_imports_are_refused() {
        for bad in [
            "openshell:compute/root@0.3.0",
            "openshell:compute/log",
            "acme:evil/net@1.0.0",
            "env",
        ] {
            assert!(
                matches!(
                    check([bad], &Capability::ALL),
                    Err(GrantError::UnknownImport { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_component_of_another_world_version_is_refused_by_name() {
        let err = check(["openshell:compute/log@0.1.0"], &Capability::ALL).unwrap_err();
        assert!(matches!(err, GrantError::OtherWorld { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("@0.1.0") && text.contains("rebuild"),
            "{text}"
        );
        let exports = ["openshell:compute/driver@0.1.0"];
        assert!(matches!(
            check_exports(exports),
            Err(GrantError::OtherWorld { .. })
        ));
        assert!(check_exports(["openshell:compute/driver@0.3.0", "wasi:x/y@1.0.0"]).is_ok());
    }
}
