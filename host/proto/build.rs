//! Generates the gRPC bindings and a descriptor set for server reflection.
//!
//! Paths are taken when the script runs, not when it is compiled, and the
//! rerun trigger is relative: checkouts at different paths (CI clones) share
//! one target dir, and each must compile its own `proto/`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../../proto");
    let files = [
        "openshell/v1/openshell.proto",
        "openshell/v1/supervisor.proto",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: a decoded frame's payload is a
        // slice of the buffer it arrived in, not a copy (the relay's data).
        .bytes(".")
        .file_descriptor_set_path(out.join("openshell_descriptor.bin"))
        .compile_protos(&files.map(|f| root.join(f)), std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
