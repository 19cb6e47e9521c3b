fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a machine with only Rust builds strata.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_protos(
        &["proto/replica.proto", "proto/controller.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
