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

/// A field holding an enum number its enum does not define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEnum {
    /// The field's proto path from the request (`rules[2].consent_denied.purpose`).
    pub field: String,
    /// The number sent.
    pub value: i32,
    /// The enum's full proto name.
    pub enum_name: &'static str,
}

impl UnknownEnum {
    fn new(field: String, value: i32, enum_name: &'static str) -> Self {
        Self {
            field,
            value,
            enum_name,
        }
    }
}

/// Walks a message for enum fields holding numbers their enum does not
/// define (proto3 keeps them as plain numbers). Implemented for every
/// message of the CLM packages by the build script; paths are built only
/// for the fields reported.
pub trait KnownEnums {
    /// Pushes every unknown enum value under this message to `out`, its
    /// path below `at()`.
    fn unknown_enums(&self, at: &dyn Fn() -> String, out: &mut Vec<UnknownEnum>);
}

impl KnownEnums for () {
    fn unknown_enums(&self, _at: &dyn Fn() -> String, _out: &mut Vec<UnknownEnum>) {}
}

/// Every unknown enum value in `message`, with its field path.
pub fn unknown_enums<M: KnownEnums + ?Sized>(message: &M) -> Vec<UnknownEnum> {
    let mut out = Vec::new();
    message.unknown_enums(&String::new, &mut out);
    out
}

fn join(at: &dyn Fn() -> String, field: &str) -> String {
    let at = at();
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

fn index(at: &dyn Fn() -> String, i: usize) -> String {
    format!("{}[{i}]", at())
}

fn key(at: &dyn Fn() -> String, k: &dyn std::fmt::Debug) -> String {
    format!("{}[{k:?}]", at())
}

include!(concat!(env!("OUT_DIR"), "/known_enums.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(found: Vec<UnknownEnum>) -> Vec<(String, i32)> {
        found.into_iter().map(|u| (u.field, u.value)).collect()
    }

    #[test]
    fn unknown_enum_values_are_found_with_their_proto_paths() {
        use scoring::{ConsentDenial, ScoringModel, ScoringRule, Threshold, scoring_rule::Trigger};
        let model = ScoringModel {
            rules: vec![
                ScoringRule::default(),
                ScoringRule {
                    trigger: Some(Trigger::ConsentDenied(ConsentDenial {
                        purpose: 99,
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            ],
            thresholds: vec![Threshold {
                direction: 1,
                to_stage: -4,
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = scoring::CreateScoringModelRequest {
            scoring_model: Some(model),
            ..Default::default()
        };
        assert_eq!(
            fields(unknown_enums(&req)),
            vec![
                ("scoring_model.rules[1].consent_denied.purpose".into(), 99),
                ("scoring_model.thresholds[0].to_stage".into(), -4),
            ]
        );
        // Defined values (UNSPECIFIED included) are not reported.
        assert!(unknown_enums(&scoring::CreateScoringModelRequest::default()).is_empty());
    }

    #[test]
    fn repeated_and_map_enum_values_are_checked() {
        let policy = customer::MergePolicy {
            attribute_policies: [("tier".to_owned(), 1), ("plan".to_owned(), 77)].into(),
            ..Default::default()
        };
        assert_eq!(
            fields(unknown_enums(&policy)),
            vec![("attribute_policies[\"plan\"]".into(), 77)]
        );
        let watch = common::WatchChangesRequest::default();
        assert!(unknown_enums(&watch).is_empty());
    }
}
