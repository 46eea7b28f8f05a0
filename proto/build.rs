//! Compiles the `.proto` files with protox (pure Rust, so the build needs no `protoc`) and
//! generates the prost messages and tonic clients/servers:
//! * `proto/keybroker/v1/keybroker.proto` — keybroker's own API;
//! * `proto/k8s/kms/v2/api.proto` — the Kubernetes KMS v2 plugin API (package `v2`).
//!
//! Both use [`crate::codec::Codec`] (a request that does not decode is INVALID_ARGUMENT, not
//! INTERNAL). Each API's encoded descriptor set is kept in OUT_DIR for gRPC server reflection
//! (kept apart so that a listener lists only the services it serves).
use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    for (proto, descriptor) in [
        (
            "proto/keybroker/v1/keybroker.proto",
            "keybroker_descriptor.bin",
        ),
        ("proto/k8s/kms/v2/api.proto", "kms_v2_descriptor.bin"),
    ] {
        let fds = protox::compile([proto], ["proto"])?;
        fs::write(out.join(descriptor), fds.encode_to_vec())?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .codec_path("crate::codec::Codec")
            .compile_fds(fds)?;
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
