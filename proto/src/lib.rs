//! The `keybroker.v1` gRPC API, generated from `proto/keybroker/v1/keybroker.proto`.
//!
//! Every message and field is documented in the `.proto` file; the docs are carried into the
//! generated code.

pub mod codec;

/// `keybroker.v1`: messages, `key_broker_client`/`key_broker_server` and
/// `key_management_client`/`key_management_server`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keybroker.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keybroker_descriptor.bin"));
