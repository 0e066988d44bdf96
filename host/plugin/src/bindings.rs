//! The one place the WIT world is turned into Rust (host side).

pub use crate::caps::{ImageHandle, NetworkHandle, ProcessHandle, RootfsHandle, VmHandle};

wasmtime::component::bindgen!({
    world: "compute-driver",
    path: "../../wit",
    imports: { default: async | trappable },
    exports: { default: async },
    trappable_error_type: {
        "openshell:compute/types.cap-error" => crate::caps::CapabilityError,
    },
    with: {
        "openshell:compute/image.prepared-image": ImageHandle,
        "openshell:compute/process.sandbox-process": ProcessHandle,
        "openshell:compute/network.vm-network": NetworkHandle,
        "openshell:compute/rootfs.staged-rootfs": RootfsHandle,
        "openshell:compute/vm.microvm": VmHandle,
    },
});

pub use exports::openshell::compute::driver;
pub use openshell::compute::types;
