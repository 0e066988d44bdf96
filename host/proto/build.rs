//! Generates the gRPC bindings and a descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "openshell/v1/openshell.proto",
        "openshell/v1/supervisor.proto",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("openshell_descriptor.bin"))
        .compile_protos(&files.map(|f| root.join(f)), std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
