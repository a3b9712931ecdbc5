//! Generates the API code from `proto/` with the `protoc` on PATH (Debian's
//! `protobuf-compiler`) or named by `$PROTOC`; nothing is downloaded.

use std::path::{Path, PathBuf};

fn proto_files(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, found)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            found.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a compiled build script is reused by
    // every checkout sharing a target directory, and must not keep reading
    // the proto files of the checkout it was first compiled in.
    let proto_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    // Every file, not just the directory: a directory's mtime does not change
    // when a file in it is edited in place.
    let mut files = Vec::new();
    proto_files(&proto_dir, &mut files)?;
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    connectrpc_axum_build::compile_dir(&proto_dir)
        .include_file("protos.rs")
        .with_tonic()
        .with_tonic_client()
        .with_connect_client()
        .compile()?;
    // The descriptor set too (after the generator, which may clear
    // OUT_DIR): clients that build requests from a method's name read it.
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("descriptor.bin");
    let status = std::process::Command::new(protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", descriptor.display()))
        .arg(format!("-I{}", proto_dir.display()))
        .args(&files)
        .status()?;
    if !status.success() {
        return Err(format!("protoc could not write the descriptor set: {status}").into());
    }
    Ok(())
}
