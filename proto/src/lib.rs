//! The gRPC APIs keybroker serves, generated from the `.proto` files under `proto/`.
//!
//! Every message and field is documented in the `.proto` files; the docs are carried into the
//! generated code.

pub mod codec;

/// `keybroker.v1`: messages, `key_broker_client`/`key_broker_server` and
/// `key_management_client`/`key_management_server`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keybroker.v1");
}

/// The Kubernetes KMS v2 plugin API (proto package `v2`, service `v2.KeyManagementService`),
/// wire-compatible with kube-apiserver's `k8s.io/kms/apis/v2/api.proto`.
pub mod kms_v2 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v2");
}

/// The encoded `FileDescriptorSet` of `keybroker.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keybroker_descriptor.bin"));

/// The encoded `FileDescriptorSet` of the KMS v2 API (package `v2`).
pub const KMS_V2_FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kms_v2_descriptor.bin"));
