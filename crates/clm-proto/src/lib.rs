//! Generated gRPC code for every CLM API, one module per proto package,
//! plus [`FILE_DESCRIPTOR_SET`] for server reflection.
//!
//! The `.proto` files under `proto/` at the workspace root are the source
//! of truth; clients in other languages generate from the same files.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Encoded `FileDescriptorSet` of every CLM proto (for reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/clm_descriptor.bin"));

pub mod clm {
    pub mod common {
        pub mod v1 {
            tonic::include_proto!("clm.common.v1");
        }
    }
    pub mod customer {
        pub mod v1 {
            tonic::include_proto!("clm.customer.v1");
        }
    }
    pub mod scoring {
        pub mod v1 {
            tonic::include_proto!("clm.scoring.v1");
        }
    }
    pub mod feedback {
        pub mod v1 {
            tonic::include_proto!("clm.feedback.v1");
        }
    }
    pub mod segmentation {
        pub mod v1 {
            tonic::include_proto!("clm.segmentation.v1");
        }
    }
    pub mod loyalty {
        pub mod v1 {
            tonic::include_proto!("clm.loyalty.v1");
        }
    }
}

/// Minimal vendored googleapis packages (`google.longrunning`, `google.rpc`).
pub mod google {
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod event_types;

pub use clm::common::v1 as common;
pub use clm::customer::v1 as customer;
pub use clm::feedback::v1 as feedback;
pub use clm::loyalty::v1 as loyalty;
pub use clm::scoring::v1 as scoring;
pub use clm::segmentation::v1 as segmentation;

/// Type URL prefix used for `google.protobuf.Any` payloads.
pub const TYPE_URL_PREFIX: &str = "type.googleapis.com/";

/// Packs a message into a `google.protobuf.Any` with its full proto name.
pub fn pack_any<M: prost::Name>(message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: M::type_url(),
        value: prost::Message::encode_to_vec(message),
    }
}
