//! The one crate that compiles `proto/`: generated tonic clients, servers
//! and messages for `openshell.v1`, plus the descriptor set that server
//! reflection serves. Nothing else lives here.

#[allow(
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]
pub mod v1 {
    tonic::include_proto!("openshell.v1");
}

/// Encoded `FileDescriptorSet` of every proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("openshell_descriptor");

pub use v1::*;
