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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1 as pb;

    /// A message encodes to the same bytes every time: a template's parameters are a map, and a
    /// map kept as a HashMap re-encoded its entries in a per-process order (found by the
    /// `proto_decode` fuzz target).
    #[test]
    fn a_map_encodes_in_one_order() {
        let params = (0..16).map(|i| (format!("p{i}"), i.to_string())).collect();
        let spec = pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Template(pb::TemplateJob {
                name: "t".into(),
                params,
            })),
        };
        let bytes = spec.encode_to_vec();
        let again = pb::JobSpec::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(bytes, again.encode_to_vec());
        // The fuzz input itself: an ExplainJobRequest whose template has two parameters.
        let input =
            b"\n,\x1a\"\x12\x00\x12\x12@\xff\xff\n\n\n\n\n\n\x01\x04x@h(hhhhhhhhhh!hhhhhhhhhhh$";
        if let Ok(message) = pb::ExplainJobRequest::decode(&input[..]) {
            let encoded = message.encode_to_vec();
            let again = pb::ExplainJobRequest::decode(encoded.as_slice()).expect("decodes");
            assert_eq!(encoded, again.encode_to_vec());
        }
    }
}
