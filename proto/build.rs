fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No system protoc is assumed: the vendored binary keeps builds hermetic.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Undecodable requests (e.g. invalid UTF-8) are INVALID_ARGUMENT, see src/codec.rs.
        .codec_path("crate::codec::ClientErrorCodec")
        // Server reflection serves this descriptor set so grpcurl needs no .proto file.
        .file_descriptor_set_path(out_dir.join("deepseek_descriptor.bin"))
        .compile_with_config(config, &["deepseek/v1/inference.proto"], &["."])?;
    Ok(())
}
