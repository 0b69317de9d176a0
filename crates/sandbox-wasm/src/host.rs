//! The host side of the ABI: the state of one run and the functions the guest may import.

use arrow::array::RecordBatch;
use arrow::buffer::Buffer;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamDecoder;
use arrow::ipc::writer::StreamWriter;
use wasmtime::{Caller, Engine, Extern, Linker, ResourceLimiter};

use crate::abi::{IMPORT_MODULE, MEMORY};
use crate::error::{Abort, Limit, Result, WasmError};
use crate::runtime::WasmLimits;

/// Fuel charged per byte the host copies for the guest, so that host work counts as work too.
const FUEL_PER_KIB: u64 = 64;

/// Memory and table limits of one store. Records which limit refused a growth, so the error can
/// name it.
pub(crate) struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    hit: Option<(Limit, String)>,
}

impl Limiter {
    pub(crate) fn hit(&self) -> Option<WasmError> {
        self.hit
            .clone()
            .map(|(limit, detail)| WasmError::limit(limit, detail))
    }

    /// Allows a growth up to `max`, or records the limit and aborts the guest.
    fn allow(
        &mut self,
        limit: Limit,
        desired: usize,
        max: usize,
        unit: &str,
    ) -> wasmtime::Result<bool> {
        if desired <= max {
            return Ok(true);
        }
        let detail = format!("the guest asked for {desired} {unit}; the limit is {max}");
        self.hit = Some((limit, detail.clone()));
        Err(wasmtime::Error::new(Abort(WasmError::limit(limit, detail))))
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.allow(Limit::Memory, desired, self.memory_bytes, "bytes of memory")
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.allow(Limit::Table, desired, self.table_elements, "table elements")
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// Output batches as the guest emits them, decoded and counted against the limits.
pub(crate) struct Output {
    schema: Option<SchemaRef>,
    batches: Vec<RecordBatch>,
    bytes: usize,
    rows: usize,
    emits: usize,
    max_bytes: usize,
    max_rows: usize,
    max_emits: usize,
}

impl Output {
    fn accept(&mut self, bytes: &[u8]) -> Result<()> {
        self.emits += 1;
        if self.emits > self.max_emits {
            return Err(WasmError::limit(
                Limit::OutputBatches,
                format!("more than {} output_emit calls", self.max_emits),
            ));
        }
        self.bytes += bytes.len();
        if self.bytes > self.max_bytes {
            return Err(WasmError::limit(
                Limit::OutputBytes,
                format!("more than {} output bytes", self.max_bytes),
            ));
        }
        // The incremental decoder never allocates more than the bytes it was given: a reader
        // that trusts a length prefix would let a guest make the host allocate gigabytes.
        let not_arrow = |e: arrow::error::ArrowError| {
            WasmError::Abi(format!("output is not a readable Arrow IPC stream: {e}"))
        };
        // Every message checked first: no compressed buffer (whose claimed size the decoder
        // would allocate), every buffer inside its body.
        crate::untrusted_ipc::check_ipc_stream(bytes).map_err(|e| {
            WasmError::Abi(format!("output is not a readable Arrow IPC stream: {e}"))
        })?;
        // The checks cover the buffers, not every header field: Arrow's reader still panics on
        // some forged schemas and batches (an unknown type, a validity buffer shorter than its
        // column). A panic here would end the job without its journaled end, so it is an
        // unreadable output like any other.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut decoder = StreamDecoder::new();
            let mut buffer = Buffer::from(bytes.to_vec());
            let mut batches = Vec::new();
            let mut rows = self.rows;
            while !buffer.is_empty() {
                if let Some(batch) = decoder.decode(&mut buffer).map_err(not_arrow)? {
                    rows += batch.num_rows();
                    if rows > self.max_rows {
                        return Err(WasmError::limit(
                            Limit::OutputRows,
                            format!("more than {} output rows", self.max_rows),
                        ));
                    }
                    batches.push(batch);
                }
            }
            decoder.finish().map_err(not_arrow)?;
            let schema = decoder
                .schema()
                .ok_or_else(|| WasmError::Abi("output stream without a schema".into()))?;
            Ok((schema, batches, rows))
        }))
        .map_err(|_| WasmError::Abi("output is not a readable Arrow IPC stream".into()))?;
        let (schema, batches, rows) = decoded?;
        self.rows = rows;
        match &self.schema {
            None => self.schema = Some(schema),
            Some(first) if first.fields() != schema.fields() => {
                return Err(WasmError::Abi(
                    "every output_emit must use the same schema".into(),
                ));
            }
            Some(_) => {}
        }
        self.batches.extend(batches);
        Ok(())
    }

    pub(crate) fn finish(self) -> (Option<SchemaRef>, Vec<RecordBatch>) {
        (self.schema, self.batches)
    }
}

/// Guest log lines: bounded in count and length; they go to the journal, never to the client.
pub(crate) struct Logs {
    pub(crate) lines: Vec<String>,
    max_lines: usize,
    max_line_bytes: usize,
}

/// The state of one run, owned by its store.
pub(crate) struct HostState {
    pub(crate) limiter: Limiter,
    input: std::vec::IntoIter<RecordBatch>,
    /// The current input batch, encoded (never empty: a stream holds at least its schema); empty
    /// before the first `input_next` and after the last. The buffer is reused from batch to batch.
    current: Vec<u8>,
    params: Vec<u8>,
    pub(crate) output: Output,
    pub(crate) logs: Logs,
}

impl HostState {
    pub(crate) fn new(limits: &WasmLimits, input: Vec<RecordBatch>, params: Vec<u8>) -> Self {
        HostState {
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                hit: None,
            },
            input: input.into_iter(),
            current: Vec::new(),
            params,
            output: Output {
                schema: None,
                batches: Vec::new(),
                bytes: 0,
                rows: 0,
                emits: 0,
                max_bytes: limits.max_output_bytes,
                max_rows: limits.max_output_rows,
                max_emits: limits.max_output_batches,
            },
            logs: Logs {
                lines: Vec::new(),
                max_lines: limits.max_log_lines,
                max_line_bytes: limits.max_log_line_bytes,
            },
        }
    }
}

fn abort(error: WasmError) -> wasmtime::Error {
    wasmtime::Error::new(Abort(error))
}

fn abi(message: impl Into<String>) -> wasmtime::Error {
    abort(WasmError::Abi(message.into()))
}

/// The guest's memory and a range in it, checked.
fn range(ptr: i32, len: i32, memory_size: usize) -> wasmtime::Result<std::ops::Range<usize>> {
    let (Ok(start), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return Err(abi("negative pointer or length"));
    };
    let end = start
        .checked_add(len)
        .filter(|end| *end <= memory_size)
        .ok_or_else(|| abi("buffer outside the guest's memory"))?;
    Ok(start..end)
}

fn memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export(MEMORY) {
        Some(Extern::Memory(memory)) => Ok(memory),
        _ => Err(abi("the guest exports no memory")),
    }
}

/// Charges fuel for host work on the guest's behalf.
fn charge(caller: &mut Caller<'_, HostState>, bytes: usize) -> wasmtime::Result<()> {
    let cost = (bytes as u64 / 1024 + 1) * FUEL_PER_KIB;
    let left = caller.get_fuel()?;
    if left < cost {
        return Err(abort(WasmError::limit(
            Limit::Fuel,
            "the guest used up its work budget",
        )));
    }
    caller.set_fuel(left - cost)
}

/// Copies host bytes into the guest's memory at `ptr`, at most `len` of them.
fn copy_in(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
    pick: impl Fn(&HostState) -> Option<&[u8]>,
) -> wasmtime::Result<i32> {
    let memory = memory(caller)?;
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    let source = pick(state).ok_or_else(|| abi("nothing to read"))?;
    if (len as i64) < source.len() as i64 {
        return Err(abi(format!(
            "buffer of {len} bytes is too small for {} bytes",
            source.len()
        )));
    }
    let target = range(ptr, source.len() as i32, data.len())?;
    data[target].copy_from_slice(source);
    let copied = source.len();
    charge(caller, copied)?;
    Ok(copied as i32)
}

/// The host functions of the ABI.
pub(crate) fn linker(engine: &Engine) -> Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    let fail = |e: wasmtime::Error| WasmError::Internal(e.to_string());
    linker
        .func_wrap(
            IMPORT_MODULE,
            "input_next",
            |mut caller: Caller<'_, HostState>| -> wasmtime::Result<i64> {
                let state = caller.data_mut();
                let Some(batch) = state.input.next() else {
                    state.current.clear();
                    return Ok(-1);
                };
                encode(&batch, &mut state.current).map_err(abort)?;
                let len = state.current.len();
                charge(&mut caller, len)?;
                Ok(len as i64)
            },
        )
        .map_err(fail)?;
    linker
        .func_wrap(
            IMPORT_MODULE,
            "input_read",
            |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
                copy_in(&mut caller, ptr, len, |s| {
                    (!s.current.is_empty()).then_some(s.current.as_slice())
                })
            },
        )
        .map_err(fail)?;
    linker
        .func_wrap(
            IMPORT_MODULE,
            "params_read",
            |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
                copy_in(&mut caller, ptr, len, |s| Some(s.params.as_slice()))
            },
        )
        .map_err(fail)?;
    linker
        .func_wrap(
            IMPORT_MODULE,
            "output_emit",
            |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
                let memory = memory(&mut caller)?;
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let source = range(ptr, len, data.len())?;
                state.output.accept(&data[source]).map_err(abort)?;
                charge(&mut caller, len as usize)?;
                Ok(0)
            },
        )
        .map_err(fail)?;
    linker
        .func_wrap(
            IMPORT_MODULE,
            "log",
            |mut caller: Caller<'_, HostState>, ptr: i32, len: i32| -> wasmtime::Result<()> {
                let memory = memory(&mut caller)?;
                let (data, state) = memory.data_and_store_mut(&mut caller);
                let source = range(ptr, len, data.len())?;
                let logs = &mut state.logs;
                if logs.lines.len() >= logs.max_lines {
                    return Err(abort(WasmError::limit(
                        Limit::Log,
                        format!("more than {} log lines", logs.max_lines),
                    )));
                }
                let bytes = &data[source];
                let kept = &bytes[..bytes.len().min(logs.max_line_bytes)];
                let mut line = String::from_utf8_lossy(kept).into_owned();
                line.retain(|c| !c.is_control());
                logs.lines.push(line);
                charge(&mut caller, len as usize)?;
                Ok(())
            },
        )
        .map_err(fail)?;
    Ok(linker)
}

/// One input batch as a self-contained Arrow IPC stream (schema, batch, end marker). View types
/// (DataFusion's `Utf8View`) are sent as their plain forms, which every Arrow library reads.
fn encode(batch: &RecordBatch, into: &mut Vec<u8>) -> Result<()> {
    let fail =
        |e: arrow::error::ArrowError| WasmError::Internal(format!("cannot encode input: {e}"));
    let batch = plain_types(batch).map_err(fail)?;
    into.clear();
    let mut writer = StreamWriter::try_new(into, &batch.schema()).map_err(fail)?;
    writer.write(&batch).map_err(fail)?;
    writer.finish().map_err(fail)
}

fn plain_types(batch: &RecordBatch) -> arrow::error::Result<RecordBatch> {
    use arrow::datatypes::{DataType, Field, Schema};
    let plain = |t: &DataType| match t {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    };
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| plain(f.data_type()).is_some())
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match plain(field.data_type()) {
            Some(target) => {
                columns.push(arrow::compute::cast(column, &target)?);
                fields.push(Field::new(field.name(), target, field.is_nullable()));
            }
            None => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, BooleanArray, StringArray};
    use std::sync::Arc;

    /// A guest's output with a few header or body bytes changed is refused or read, never a
    /// panic (Arrow's reader panics on some forged schemas and validity buffers; the run would
    /// end without its journaled end).
    #[test]
    fn forged_output_streams_are_errors_not_panics() {
        let batch = RecordBatch::try_from_iter([
            (
                "flag",
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])) as ArrayRef,
            ),
            (
                "name",
                Arc::new(StringArray::from(vec!["a", "bb", "ccc"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        let plain = writer.into_inner().unwrap();
        let limits = WasmLimits::default();
        let mut state = HostState::new(&limits, Vec::new(), Vec::new());
        state.output.accept(&plain).expect("the plain stream reads");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            let mut forged = plain.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed >> 20) as usize % forged.len();
                forged[at] = seed as u8;
            }
            let mut state = HostState::new(&limits, Vec::new(), Vec::new());
            let _ = state.output.accept(&forged);
        }
    }
}
