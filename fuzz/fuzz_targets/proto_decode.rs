//! Decoding every request message of the service from arbitrary bytes: an error or a message,
//! never a panic, and a decoded message re-encodes to bytes that decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sandbox_proto::v1 as pb;

/// "The same message" is compared by its encoding, not by `==`: a float field may hold NaN, which
/// is never equal to itself although it survives the round trip bit for bit.
fn round_trip<M: Message + Default>(data: &[u8]) {
    if let Ok(message) = M::decode(data) {
        let encoded = message.encode_to_vec();
        let again = M::decode(encoded.as_slice()).expect("re-encoded message decodes");
        assert_eq!(
            encoded,
            again.encode_to_vec(),
            "the round trip changed the message"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 12 {
        0 => round_trip::<pb::SubmitJobRequest>(rest),
        1 => round_trip::<pb::FetchResultRequest>(rest),
        2 => round_trip::<pb::ExplainJobRequest>(rest),
        3 => round_trip::<pb::UploadModuleRequest>(rest),
        4 => round_trip::<pb::ApproveModuleRequest>(rest),
        5 => round_trip::<pb::AddConsentRequest>(rest),
        6 => round_trip::<pb::SubmitTemplateRequest>(rest),
        7 => round_trip::<pb::ListEventsRequest>(rest),
        8 => round_trip::<pb::QueryEventsRequest>(rest),
        9 => round_trip::<pb::GetInclusionProofRequest>(rest),
        10 => round_trip::<pb::RefreshBudgetRequest>(rest),
        _ => round_trip::<pb::SignedCheckpoint>(rest),
    }
});
