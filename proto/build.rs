//! Compiles proto/gemma.proto with protox (pure Rust: no system protoc) and generates the prost
//! messages and tonic services.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/gemma.proto");
    let fds = protox::compile(["proto/gemma.proto"], ["proto/"])?;
    tonic_prost_build::configure()
        .bytes(".gemma.v1.TensorData.data")
        .compile_fds(fds)?;
    Ok(())
}
