fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so a machine with only Rust builds strata.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().compile_protos(
        &["proto/replica.proto", "proto/controller.proto"],
        &["proto"],
    )?;
    // The CSI spec imports google/protobuf/{descriptor,timestamp,wrappers}:
    // they come with the vendored protoc, and map to `prost-types`.
    let well_known = protoc_bin_vendored::include_path()?;
    let well_known = well_known
        .to_str()
        .ok_or("the protoc include path is not UTF-8")?;
    tonic_prost_build::configure().compile_protos(&["proto/csi.proto"], &["proto", well_known])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
