// Generates the containerd snapshots v1 API (server and client) from the vendored protos.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos =
        ["proto/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto"];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
