//! Code generated from `proto/sandbox/v1/*.proto`: the wire types and tonic stubs. Only the server
//! and the CLI know these types; the domain crates never see them.
//!
//! The build script compiles the protos with `protox` (pure Rust: there is no system `protoc`) and
//! `tonic-prost-build`. It reads `CARGO_MANIFEST_DIR` at run time, not at its own compile time: a
//! build script compiled for one checkout can be reused from a shared target dir by another, and
//! must read that checkout's protos.

#![allow(clippy::all, missing_docs, unreachable_pub)]

/// Package `sandbox.v1`.
pub mod v1 {
    tonic::include_proto!("sandbox.v1");
}
