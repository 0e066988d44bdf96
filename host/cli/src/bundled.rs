//! The bundled driver components, embedded in the binary: `build.rs` builds
//! them from `drivers/` with the binary, so every install loads the drivers
//! of its own source. `gateway start --driver-dir DIR` still wins.

use openshell_gateway::server::EmbeddedDriver;

macro_rules! embedded {
    ($name:literal) => {
        EmbeddedDriver {
            name: $name,
            wasm: include_bytes!(concat!(
                env!("OUT_DIR"),
                "/openshell_driver_",
                $name,
                ".wasm"
            )),
        }
    };
}

pub const DRIVERS: &[EmbeddedDriver] = &[embedded!("process"), embedded!("vm")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_driver_is_embedded_as_a_component() {
        let names: Vec<_> = DRIVERS.iter().map(|d| d.name).collect();
        assert_eq!(names, ["process", "vm"]);
        for d in DRIVERS {
            // The component-model preamble: magic, then layer 1.
            assert_eq!(&d.wasm[..4], b"\0asm", "{}", d.name);
            assert_eq!(&d.wasm[6..8], &[1, 0], "{} is not a component", d.name);
        }
    }
}
