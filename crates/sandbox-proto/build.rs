//! Compiles `proto/sandbox/v1/*.proto` with protox (pure Rust, no system protoc) and generates
//! tonic client and server code with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: a build script compiled for one checkout may be reused
    // from a shared target dir by another, and must read that checkout's files.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("sandbox/v1/sandbox.proto"),
        root.join("sandbox/v1/audit.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        // Maps as BTreeMap: a message encodes to the same bytes every time (a HashMap's order
        // changes per process), which digests, signatures and the fuzz round trip rely on.
        .btree_map(".")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
