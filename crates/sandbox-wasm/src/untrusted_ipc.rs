//! Arrow IPC from outside the host (a guest's output, a Flight client's parameter batch), checked
//! before a decoder reads it: Arrow's readers trust a message's header, so a compressed buffer
//! claiming 16 TB of uncompressed data makes them allocate 16 TB (and the allocation failure
//! aborts the process), a buffer past the end of the body makes them panic, and misaligned
//! buffers that all overlap the whole body are each copied to realign them (a small message
//! becomes gigabytes). A message is accepted only as a schema or a record batch (no
//! dictionaries, whose deltas a decoder accumulates across messages), uncompressed, with a body
//! of the declared length and its buffers aligned to 8 bytes, in order, without overlap, inside
//! it.

use arrow::ipc::{MessageHeader, root_as_message};

/// The longest a batch from outside may claim to be, in rows.
pub const MAX_UNTRUSTED_ROWS: i64 = 10_000_000;

/// Checks one message: its flatbuffer `header` and the length of the `body` that came with it.
pub fn check_ipc_message(header: &[u8], body_len: usize) -> Result<(), String> {
    ipc_message_rows(header, body_len).map(drop)
}

/// Checks one message like [`check_ipc_message`] and returns the rows it carries (none for a
/// schema or an empty message), read from its header alone: a caller that only needs to know
/// whether values came never hands the message to a decoder.
pub fn ipc_message_rows(header: &[u8], body_len: usize) -> Result<usize, String> {
    if header.is_empty() {
        return Ok(0);
    }
    let message = root_as_message(header).map_err(|e| format!("unreadable IPC message: {e}"))?;
    if usize::try_from(message.bodyLength()).ok() != Some(body_len) {
        return Err(format!(
            "an IPC message declares a body of {} bytes and carries {body_len}",
            message.bodyLength()
        ));
    }
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::Schema => return Ok(0),
        other => return Err(format!("IPC messages of type {other:?} are not accepted")),
    };
    let Some(batch) = batch else {
        return Err("an IPC batch message without its batch".into());
    };
    if batch.compression().is_some() {
        return Err("compressed IPC buffers are not accepted: send them uncompressed".into());
    }
    if !(0..=MAX_UNTRUSTED_ROWS).contains(&batch.length()) {
        return Err(format!(
            "an IPC batch claims {} rows (at most {MAX_UNTRUSTED_ROWS})",
            batch.length()
        ));
    }
    for node in batch.nodes().iter().flatten() {
        if !(0..=MAX_UNTRUSTED_ROWS).contains(&node.length())
            || node.null_count() < 0
            || node.null_count() > node.length()
        {
            return Err("an IPC field claims an impossible length".into());
        }
    }
    let mut end_of_previous = 0i64;
    for buffer in batch.buffers().iter().flatten() {
        let (offset, length) = (buffer.offset(), buffer.length());
        let inside = offset >= end_of_previous
            && offset % 8 == 0
            && length >= 0
            && offset
                .checked_add(length)
                .is_some_and(|end| end <= message.bodyLength());
        if !inside {
            return Err(
                "an IPC buffer is misaligned, overlaps another or lies outside its body".into(),
            );
        }
        end_of_previous = offset + length;
    }
    // Within 0..=MAX_UNTRUSTED_ROWS, checked above.
    Ok(batch.length() as usize)
}

/// Checks every message of an IPC stream held in memory (continuation marker, metadata length,
/// metadata, body; the end marker or the end of the bytes ends it).
pub fn check_ipc_stream(bytes: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let word = |at: usize| -> Option<i32> {
        bytes
            .get(at..at.checked_add(4)?)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    while at < bytes.len() {
        let Some(mut length) = word(at) else {
            return Err("an IPC stream ends inside a message prefix".into());
        };
        at += 4;
        if length == -1 {
            length = word(at).ok_or("an IPC stream ends inside a message prefix")?;
            at += 4;
        }
        if length == 0 {
            return Ok(());
        }
        let length = usize::try_from(length).map_err(|_| "a negative IPC message length")?;
        let header = bytes
            .get(at..at.saturating_add(length))
            .ok_or("an IPC stream ends inside a message header")?;
        at += length;
        let body_len = match root_as_message(header) {
            Ok(message) => usize::try_from(message.bodyLength())
                .map_err(|_| "a negative IPC body length".to_string())?,
            Err(e) => return Err(format!("unreadable IPC message: {e}")),
        };
        if bytes.len() - at < body_len {
            return Err("an IPC stream ends inside a message body".into());
        }
        check_ipc_message(header, body_len)?;
        at += body_len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
    use std::sync::Arc;

    fn stream(options: IpcWriteOptions) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..1000))],
        )
        .unwrap();
        let mut writer = StreamWriter::try_new_with_options(Vec::new(), &schema, options).unwrap();
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        writer.into_inner().unwrap()
    }

    #[test]
    fn plain_streams_pass_and_forged_ones_do_not() {
        let plain = stream(IpcWriteOptions::default());
        check_ipc_stream(&plain).unwrap();
        // The writer's buffers, with a compression field: refused before any decoder sees it.
        let compressed = stream(
            IpcWriteOptions::default()
                .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
                .unwrap(),
        );
        assert!(
            check_ipc_stream(&compressed)
                .unwrap_err()
                .contains("compressed")
        );
        // Dictionary batches are refused.
        let dictionary = {
            use arrow::array::DictionaryArray;
            use arrow::datatypes::Int32Type;
            let values: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
            let batch = RecordBatch::try_from_iter([("d", Arc::new(values) as _)]).unwrap();
            let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
            writer.write(&batch).unwrap();
            writer.finish().unwrap();
            writer.into_inner().unwrap()
        };
        assert!(check_ipc_stream(&dictionary).is_err());
        // Cut inside the body, or after a few bytes: refused, not read past the end.
        for cut in [3, 12, plain.len() - 20] {
            assert!(check_ipc_stream(&plain[..cut]).is_err(), "cut at {cut}");
        }
        // Random bytes never panic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut forged = plain.clone();
            for _ in 0..4 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                let i = (state >> 33) as usize % forged.len();
                forged[i] = (state >> 17) as u8;
            }
            let _ = check_ipc_stream(&forged);
        }
    }
}
