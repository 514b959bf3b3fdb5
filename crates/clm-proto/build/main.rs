//! Generates the Rust code for every `.proto` under `proto/` with the
//! vendored `protoc` (no system install needed) and writes the descriptor
//! set used by server reflection, and the [`KnownEnums`] walk of every
//! message (`known_enums.rs`, see `known_enums.rs` beside this file).

use std::path::PathBuf;

mod known_enums;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let root = root.canonicalize()?;
    let mut protos = Vec::new();
    collect_protos(&root, &mut protos)?;
    protos.sort();

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.enable_type_names();
    // BTreeMap keeps encodings deterministic (idempotency hashes compare them).
    config.btree_map(["."]);
    config.type_name_domain(["."], "type.googleapis.com");

    let includes = [root.clone(), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("clm_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;

    let set = std::fs::read(out_dir.join("clm_descriptor.bin"))?;
    let set = <prost_types::FileDescriptorSet as prost::Message>::decode(set.as_slice())?;
    std::fs::write(out_dir.join("known_enums.rs"), known_enums::generate(&set))?;

    println!("cargo:rerun-if-changed={}", root.display());
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    Ok(())
}

fn collect_protos(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
