//! Code generated from `proto/sandbox/v1/*.proto`: the wire types and tonic stubs. Only the server
//! and the CLI know these types; the domain crates never see them.

#![allow(clippy::all, missing_docs, unreachable_pub)]

/// Package `sandbox.v1`.
pub mod v1 {
    tonic::include_proto!("sandbox.v1");
}
