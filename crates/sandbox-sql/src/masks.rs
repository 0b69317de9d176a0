//! Desensitization (脱敏): the transforms of masked columns. The session puts them *below* the
//! consumer's catalog: a masked dataset is registered as a [`MaskedTable`], whose schema already
//! has the transformed columns and whose scan applies the transforms right above the Parquet
//! reader. No query, guarded or not, can reach the raw value, and the guard sees an ordinary
//! table scan.
//!
//! - `partial`: keep the first n and last m characters, `*` for each one in between.
//! - `pseudonym`: HMAC-SHA256 of the value under a key derived from the server secret and the
//!   consumer's org: the same entity gets the same token for one consumer, and tokens of two
//!   consumers cannot be linked without the secret.
//! - `bucket`: a number generalized to the lower bound of its bucket.
//! - `year` / `month`: a date (or `YYYY-MM...` text) generalized to `YYYY` / `YYYY-MM`.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray, StringBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, DFSchema, Result, exec_err};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use ring::hmac;
use sandbox_policy::Mask;

/// Bytes of HMAC output kept in a pseudonym (hex-encoded: twice as many characters). 128 bits: no
/// collision among any realistic number of entities.
const PSEUDONYM_BYTES: usize = 16;

/// The pseudonym key of one consumer org. Derived, never stored: HMAC(server secret, org).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PseudonymKey([u8; 32]);

impl PseudonymKey {
    /// Derives the key of `org` from the server's secret.
    pub fn derive(secret: &[u8], org: &str) -> PseudonymKey {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, format!("sandbox pseudonym v1\0{org}").as_bytes());
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(tag.as_ref());
        PseudonymKey(bytes)
    }

    /// The HMAC key that signs values; built once per batch, not per value.
    fn signer(&self) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &self.0)
    }

    /// The pseudonym of one value.
    pub fn pseudonym(&self, value: &str) -> String {
        pseudonym(&self.signer(), value)
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey(..)")
    }
}

fn pseudonym(signer: &hmac::Key, value: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let tag = hmac::sign(signer, value.as_bytes());
    let mut out = String::with_capacity(2 * PSEUDONYM_BYTES);
    for byte in &tag.as_ref()[..PSEUDONYM_BYTES] {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// Whether a mask applies to a column of this type; the engine checks every masked column at
/// start, so a transform never meets a type it cannot handle.
pub fn supports(mask: Mask, data_type: &DataType) -> bool {
    let text = matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    match mask {
        Mask::Partial { .. } | Mask::Pseudonym => text || data_type.is_integer(),
        Mask::Bucket { .. } => data_type.is_integer() || data_type.is_floating(),
        Mask::Year | Mask::Month => text || *data_type == DataType::Date32,
    }
}

/// The scalar function applying one mask. Never registered in a session: only the masked view
/// calls it, so a query cannot name it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MaskFunction {
    mask: Mask,
    key: Option<PseudonymKey>,
    signature: Signature,
}

impl MaskFunction {
    /// `key` is required for pseudonyms; without one the function fails closed on every call.
    pub fn new(mask: Mask, key: Option<PseudonymKey>) -> MaskFunction {
        MaskFunction {
            mask,
            key,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for MaskFunction {
    fn name(&self) -> &str {
        "sandbox_mask"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(match (self.mask, arg_types) {
            (Mask::Bucket { .. }, [t]) if t.is_integer() => DataType::Int64,
            (Mask::Bucket { .. }, _) => DataType::Float64,
            _ => DataType::Utf8,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [input] = args.args.as_slice() else {
            return exec_err!("sandbox_mask takes one argument");
        };
        let array = input.to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(self.apply(&array)?))
    }
}

impl MaskFunction {
    fn apply(&self, array: &ArrayRef) -> Result<ArrayRef> {
        match self.mask {
            Mask::Partial {
                keep_first,
                keep_last,
            } => map_text(array, |s| {
                partial(s, keep_first as usize, keep_last as usize)
            }),
            Mask::Pseudonym => {
                let Some(key) = &self.key else {
                    return exec_err!("no pseudonym key for this consumer");
                };
                let signer = key.signer();
                map_text(array, |s| pseudonym(&signer, s))
            }
            Mask::Year => generalize_date(array, 4),
            Mask::Month => generalize_date(array, 7),
            Mask::Bucket { width } => bucket(array, width),
        }
    }
}

/// A dataset as one consumer sees it: the table's visible columns, masked ones transformed.
#[derive(Debug)]
pub struct MaskedTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    /// Per column of `schema`: the function that masks it, if any.
    functions: Vec<Option<Arc<ScalarUDF>>>,
}

impl MaskedTable {
    /// Wraps `inner` so that each column named in `masks` reads as its transform. A pseudonym
    /// mask takes the consumer's key.
    pub fn new(
        inner: Arc<dyn TableProvider>,
        masks: &[(String, Mask)],
        key: &PseudonymKey,
    ) -> Result<MaskedTable> {
        let inner_schema = inner.schema();
        let mut fields = Vec::with_capacity(inner_schema.fields().len());
        let mut functions = Vec::with_capacity(inner_schema.fields().len());
        for field in inner_schema.fields() {
            match masks.iter().find(|(name, _)| name == field.name()) {
                Some((_, mask)) => {
                    let key = (*mask == Mask::Pseudonym).then(|| key.clone());
                    let function = MaskFunction::new(*mask, key);
                    let data_type =
                        function.return_type(std::slice::from_ref(field.data_type()))?;
                    fields.push(Field::new(field.name(), data_type, true));
                    functions.push(Some(Arc::new(ScalarUDF::new_from_impl(function))));
                }
                None => {
                    fields.push(field.as_ref().clone());
                    functions.push(None);
                }
            }
        }
        Ok(MaskedTable {
            inner,
            schema: Arc::new(Schema::new(fields)),
            functions,
        })
    }
}

#[async_trait]
impl TableProvider for MaskedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// The inner scan (same column indices: the schemas list the same columns in the same order),
    /// then a projection that applies the masks. Filters are never pushed into the inner scan:
    /// they are written against masked values and stay above this projection.
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let inner = self.inner.scan(state, projection, &[], limit).await?;
        let inner_schema = inner.schema();
        let df_schema = DFSchema::try_from(inner_schema.as_ref().clone())?;
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let mut exprs = Vec::with_capacity(indices.len());
        for (position, index) in indices.into_iter().enumerate() {
            let column = Expr::Column(Column::new_unqualified(inner_schema.field(position).name()));
            let logical = match &self.functions[index] {
                Some(function) => function.call(vec![column]),
                None => column,
            };
            exprs.push((
                state.create_physical_expr(logical, &df_schema)?,
                self.schema.field(index).name().clone(),
            ));
        }
        Ok(Arc::new(ProjectionExec::try_new(exprs, inner)?))
    }
}

/// Applies `f` to each value as text (integers by their decimal form); nulls stay null.
fn map_text(array: &ArrayRef, f: impl Fn(&str) -> String) -> Result<ArrayRef> {
    let text = cast(array, &DataType::Utf8)?;
    let text = text.as_string::<i32>();
    let mut out = StringBuilder::with_capacity(text.len(), text.len() * 16);
    for value in text.iter() {
        match value {
            Some(v) => out.append_value(f(v)),
            None => out.append_null(),
        }
    }
    Ok(Arc::new(out.finish()))
}

/// Keeps `first` leading and `last` trailing characters; every other character becomes `*`, so
/// the length stays (the policy chose that: lengths of names and codes are not secret here). A
/// value too short to hide anything is masked entirely.
fn partial(value: &str, first: usize, last: usize) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= first + last {
        return "*".repeat(chars.len());
    }
    let mut out = String::with_capacity(value.len());
    out.extend(&chars[..first]);
    out.extend(std::iter::repeat_n('*', chars.len() - first - last));
    out.extend(&chars[chars.len() - last..]);
    out
}

/// A date as its first `len` characters of `YYYY-MM-DD`. Text that does not start with a
/// `YYYY-MM` date becomes null: a value the transform cannot vouch for is not shown.
fn generalize_date(array: &ArrayRef, len: usize) -> Result<ArrayRef> {
    if let Some(dates) = array.as_primitive_opt::<Date32Type>() {
        let out: StringArray = dates
            .iter()
            .map(|d| {
                d.and_then(|days| {
                    chrono_like_date(days).map(|(y, m)| {
                        let full = format!("{y:04}-{m:02}");
                        full[..len].to_string()
                    })
                })
            })
            .collect();
        return Ok(Arc::new(out));
    }
    let text = cast(array, &DataType::Utf8)?;
    let out: StringArray = text
        .as_string::<i32>()
        .iter()
        .map(|v| {
            v.filter(|s| looks_like_month(s))
                .map(|s| s[..len].to_string())
        })
        .collect();
    Ok(Arc::new(out))
}

fn looks_like_month(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 7
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
}

/// Year and month of a day count since 1970-01-01 (proleptic Gregorian), by Howard Hinnant's
/// `civil_from_days`. `None` outside years 0..=9999.
fn chrono_like_date(days: i32) -> Option<(i64, u32)> {
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (0..=9999)
        .contains(&year)
        .then_some((year, u32::try_from(month).ok()?))
}

/// The lower bound of each value's bucket: `floor(x / width) * width`.
fn bucket(array: &ArrayRef, width: u64) -> Result<ArrayRef> {
    if array.data_type().is_integer() {
        let values = cast(array, &DataType::Int64)?;
        let width = i64::try_from(width).unwrap_or(i64::MAX);
        let out: Int64Array = values
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .iter()
            .map(|v| v.map(|x| x.div_euclid(width).saturating_mul(width)))
            .collect();
        return Ok(Arc::new(out));
    }
    let values = cast(array, &DataType::Float64)?;
    let width = width as f64;
    let out: Float64Array = values
        .as_primitive::<datafusion::arrow::datatypes::Float64Type>()
        .iter()
        .map(|v| {
            v.filter(|x| x.is_finite())
                .map(|x| (x / width).floor() * width)
        })
        .collect();
    Ok(Arc::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_masks_keep_the_declared_ends() {
        assert_eq!(partial("广西南宁某某科技有限公司", 2, 0), "广西**********");
        assert_eq!(partial("450103", 4, 0), "4501**");
        assert_eq!(partial("91450100MA5K", 2, 2), "91********5K");
        assert_eq!(partial("ab", 2, 1), "**");
    }

    #[test]
    fn pseudonyms_are_stable_per_org_and_differ_across_orgs() {
        let a = PseudonymKey::derive(b"secret", "bank_a");
        let b = PseudonymKey::derive(b"secret", "bank_b");
        assert_eq!(a.pseudonym("x"), a.pseudonym("x"));
        assert_ne!(a.pseudonym("x"), a.pseudonym("y"));
        assert_ne!(a.pseudonym("x"), b.pseudonym("x"));
        assert_ne!(
            a.pseudonym("x"),
            PseudonymKey::derive(b"other secret", "bank_a").pseudonym("x")
        );
        assert_eq!(a.pseudonym("x").len(), 2 * PSEUDONYM_BYTES);
    }

    #[test]
    fn dates_generalize_to_year_and_month() {
        // 2024-03-15 is day 19797 since the epoch.
        assert_eq!(chrono_like_date(19_797), Some((2024, 3)));
        assert_eq!(chrono_like_date(0), Some((1970, 1)));
        assert_eq!(chrono_like_date(-1), Some((1969, 12)));
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("2024-03"), Some("bad"), None]));
        let year = generalize_date(&text, 4).unwrap();
        let year = year.as_string::<i32>();
        assert_eq!(year.value(0), "2024");
        assert!(year.is_null(1) && year.is_null(2));
    }

    #[test]
    fn buckets_floor_to_their_width() {
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![0, 999, 1000, -1]));
        let out = bucket(&ints, 1000).unwrap();
        let out = out.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(out.values().to_vec(), vec![0, 0, 1000, -1000]);
        let floats: ArrayRef = Arc::new(Float64Array::from(vec![1_500_000.0, f64::NAN]));
        let out = bucket(&floats, 1_000_000).unwrap();
        let out = out.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        assert_eq!(out.value(0), 1_000_000.0);
        assert!(out.is_null(1));
    }
}
