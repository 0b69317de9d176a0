//! Encoding and scanning of journal frames.

use ring::digest;

/// File header: identifies the format and its version.
pub(crate) const MAGIC: &[u8; 8] = b"SBXJRNL1";
/// Length and CRC before the payload.
pub(crate) const HEADER_LEN: usize = 8;
pub(crate) const HASH_LEN: usize = 32;
/// Upper bound on one payload, so a corrupt length cannot make a reader allocate gigabytes.
pub(crate) const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

pub(crate) fn chain(previous: &[u8; HASH_LEN], payload: &[u8]) -> [u8; HASH_LEN] {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(previous);
    context.update(payload);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// Appends one frame to `buffer` and returns the new chain hash.
pub(crate) fn encode(
    buffer: &mut Vec<u8>,
    previous: &[u8; HASH_LEN],
    payload: &[u8],
) -> [u8; HASH_LEN] {
    let hash = chain(previous, payload);
    let len = u32::try_from(payload.len()).expect("payload bounded by MAX_PAYLOAD");
    buffer.extend_from_slice(&len.to_le_bytes());
    buffer.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buffer.extend_from_slice(payload);
    buffer.extend_from_slice(&hash);
    hash
}

/// One step of a scan over the frames of a journal body.
#[derive(Debug)]
pub(crate) enum Scanned<'a> {
    /// A complete frame whose CRC matches.
    Frame {
        payload: &'a [u8],
        stored_hash: [u8; HASH_LEN],
        len: usize,
    },
    /// The bytes from here to the end cannot hold a complete frame, or are all zeros: a write that
    /// was cut short by a crash.
    TornTail,
    /// A complete frame that is wrong: corruption.
    Corrupt(&'static str),
    End,
}

/// Reads the frame at the start of `rest`.
pub(crate) fn scan(rest: &[u8]) -> Scanned<'_> {
    if rest.is_empty() {
        return Scanned::End;
    }
    if rest.iter().all(|&b| b == 0) {
        return Scanned::TornTail;
    }
    if rest.len() < HEADER_LEN {
        return Scanned::TornTail;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_PAYLOAD {
        return Scanned::Corrupt("invalid frame length");
    }
    let total = HEADER_LEN + len + HASH_LEN;
    if rest.len() < total {
        return Scanned::TornTail;
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        return Scanned::Corrupt("checksum mismatch");
    }
    let mut stored_hash = [0u8; HASH_LEN];
    stored_hash.copy_from_slice(&rest[HEADER_LEN + len..total]);
    Scanned::Frame {
        payload,
        stored_hash,
        len: total,
    }
}
