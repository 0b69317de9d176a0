//! The CLI's one output contract: every command builds a [`Table`] of typed [`Value`]s and prints it
//! in the format the user chose, so no command formats text of its own.
//!
//! - `table`, for people: aligned columns (numbers to the right), floats rounded to the column's
//!   precision, times in local time, text longer than [`CELL_WIDTH`] characters cut with `…`
//!   (`--wide` keeps it whole), `(no rows)` under the header of an empty table. A single record
//!   (`whoami`, `explain`) prints as `field: value` lines.
//! - `csv`, for programs: a header line, RFC 4180 quoting, full precision, times in RFC 3339 UTC,
//!   lists joined with `;`, nested values as JSON text.
//! - `json`, for programs: one JSON array of objects (one per row, keys in column order) for every
//!   command, a single record included; times in RFC 3339 UTC, lists and nested values as JSON.

use std::fmt::Write as _;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use arrow::error::ArrowError;
use arrow::util::display::{ArrayFormatter, FormatOptions};

/// Longest text a table cell shows before it is cut (`--wide` shows it whole).
pub const CELL_WIDTH: usize = 80;

/// Output format, chosen with `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON array of objects.
    Json,
}

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
    /// A point in time, Unix seconds.
    Time(i64),
    /// A list of texts (datasets, roles, columns).
    List(Vec<String>),
    /// A nested value (an output contract, the approvals of a module).
    Json(serde_json::Value),
}

impl Value {
    /// A time from Unix seconds; 0 (never, unset) is empty.
    pub fn time(seconds: u64) -> Value {
        match i64::try_from(seconds) {
            Ok(0) | Err(_) => Value::Null,
            Ok(seconds) => Value::Time(seconds),
        }
    }

    /// A time from RFC 3339 text; text that does not parse stays text.
    pub fn rfc3339(text: &str) -> Value {
        match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) => Value::Time(time.timestamp()),
            Err(_) if text.is_empty() => Value::Null,
            Err(_) => Value::Text(text.to_string()),
        }
    }

    /// Text, empty text being no value.
    pub fn text(text: impl Into<String>) -> Value {
        let text = text.into();
        if text.is_empty() {
            Value::Null
        } else {
            Value::Text(text)
        }
    }

    fn is_number(&self) -> bool {
        matches!(
            self,
            Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Null
        )
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::UInt(u) => J::from(*u),
            // NaN and infinities have no JSON form.
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Text(t) => J::String(t.clone()),
            Value::Time(t) => J::String(utc(*t)),
            Value::List(items) => J::Array(items.iter().cloned().map(J::String).collect()),
            Value::Json(v) => v.clone(),
        }
    }

    /// The value as a program reads it (CSV): full precision, UTC times.
    fn to_plain(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Text(t) => t.clone(),
            Value::Time(t) => utc(*t),
            Value::List(items) => items.join(";"),
            Value::Json(v) => v.to_string(),
        }
    }
}

fn utc(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| seconds.to_string())
}

fn local(seconds: i64) -> String {
    use chrono::TimeZone as _;
    match chrono::Local.timestamp_opt(seconds, 0) {
        chrono::LocalResult::Single(t) | chrono::LocalResult::Ambiguous(t, _) => {
            t.format("%Y-%m-%d %H:%M:%S").to_string()
        }
        chrono::LocalResult::None => utc(seconds),
    }
}

/// How a table is printed for people.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// Keep long text whole instead of cutting it at [`CELL_WIDTH`].
    pub wide: bool,
}

/// Rows of named columns: what every command prints.
#[derive(Debug, Clone, Default)]
pub struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
    record: bool,
}

impl Table {
    /// An empty table of these columns.
    pub fn new(columns: &[&str]) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            record: false,
        }
    }

    /// A single record: printed for people as `field: value` lines.
    pub fn record(fields: Vec<(&str, Value)>) -> Table {
        let (columns, row): (Vec<&str>, Vec<Value>) = fields.into_iter().unzip();
        let mut table = Table::new(&columns);
        table.rows.push(row);
        table.record = true;
        table
    }

    /// Records of named fields as rows, keeping the columns `only` names when given (a list's
    /// view for people; programs get every field). With no records, the columns are `only`'s.
    pub fn from_records(records: Vec<Vec<(&str, Value)>>, only: Option<&[&str]>) -> Table {
        let names: Vec<&str> = match (only, records.first()) {
            (Some(only), _) => only.to_vec(),
            (None, Some(first)) => first.iter().map(|(n, _)| *n).collect(),
            (None, None) => Vec::new(),
        };
        let mut table = Table::new(&names);
        for record in records {
            let row = names
                .iter()
                .map(|name| {
                    record
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(Value::Null, |(_, v)| v.clone())
                })
                .collect();
            table.push(row);
        }
        table
    }

    /// Adds a row; it must have one value per column.
    pub fn push(&mut self, row: Vec<Value>) {
        debug_assert_eq!(row.len(), self.columns.len(), "one value per column");
        self.rows.push(row);
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    pub fn rows(&self) -> &[Vec<Value>] {
        &self.rows
    }

    /// The value in `row` of the column named `column`.
    pub fn get(&self, row: usize, column: &str) -> Option<&Value> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.rows.get(row)?.get(index)
    }

    /// Replaces every value of one column (by name) with what `f` makes of it and its row index.
    pub fn map_column(&mut self, column: &str, mut f: impl FnMut(usize, &Value) -> Value) {
        if let Some(index) = self.columns.iter().position(|c| c == column) {
            for (i, row) in self.rows.iter_mut().enumerate() {
                row[index] = f(i, &row[index]);
            }
        }
    }

    /// The rows of Arrow batches, typed: integers, floats and booleans stay numbers, other types
    /// are shown as Arrow displays them (dates as ISO dates).
    pub fn from_batches(batches: &[RecordBatch]) -> Result<Table, ArrowError> {
        let Some(first) = batches.first() else {
            return Ok(Table::default());
        };
        let schema = first.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut table = Table::new(&names);
        let options = FormatOptions::default();
        for batch in batches {
            let mut columns: Vec<Vec<Value>> = Vec::with_capacity(batch.num_columns());
            for array in batch.columns() {
                columns.push(column_values(array.as_ref(), &options)?);
            }
            for row in 0..batch.num_rows() {
                table.push(columns.iter().map(|c| c[row].clone()).collect());
            }
        }
        Ok(table)
    }

    /// The table in `format`, ending with a newline.
    pub fn render(&self, format: Format, style: Style) -> String {
        match format {
            Format::Table if self.record => self.render_record(style),
            Format::Table => self.render_table(style),
            Format::Csv => self.render_csv(),
            Format::Json => self.render_json(),
        }
    }

    fn render_table(&self, style: Style) -> String {
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
        table.set_header(self.columns.clone());
        let decimals: Vec<usize> = (0..self.columns.len())
            .map(|i| float_decimals(self.rows.iter().map(|r| &r[i])))
            .collect();
        for row in &self.rows {
            table.add_row(
                row.iter()
                    .zip(&decimals)
                    .map(|(v, d)| for_people(v, *d, style))
                    .collect::<Vec<_>>(),
            );
        }
        for (i, column) in table.column_iter_mut().enumerate() {
            let numeric = !self.rows.is_empty()
                && self.rows.iter().all(|r| r[i].is_number())
                && self.rows.iter().any(|r| r[i] != Value::Null);
            if numeric {
                column.set_cell_alignment(comfy_table::CellAlignment::Right);
            }
        }
        let mut text = table.to_string();
        text.push('\n');
        if self.rows.is_empty() {
            text.push_str("(no rows)\n");
        }
        text
    }

    fn render_record(&self, style: Style) -> String {
        let mut text = String::new();
        let width = self.columns.iter().map(|c| c.chars().count()).max();
        for row in &self.rows {
            for (column, value) in self.columns.iter().zip(row) {
                let shown = match value {
                    // A list wraps at the cell width, items whole.
                    Value::List(items) if !style.wide => visible(&wrap(items)),
                    _ => for_people(value, float_decimals([value]), Style { wide: true }),
                };
                let mut lines = shown.lines();
                let first = lines.next().unwrap_or_default();
                let first = if style.wide || matches!(value, Value::List(_)) {
                    first.to_string()
                } else {
                    cut(first)
                };
                let indent = width.unwrap_or(0) + 3;
                let _ = writeln!(text, "{:<w$}{first}", format!("{column}:"), w = indent);
                for line in lines {
                    let _ = writeln!(text, "{:indent$}{line}", "");
                }
            }
        }
        text
    }

    fn render_csv(&self) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        // Writing to memory cannot fail but for an invariant of the csv crate.
        let _ = writer.write_record(&self.columns);
        for row in &self.rows {
            let _ = writer.write_record(row.iter().map(|v| visible(&v.to_plain())));
        }
        let bytes = writer.into_inner().unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn render_json(&self) -> String {
        let mut text = String::from("[");
        for (i, row) in self.rows.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push('{');
            for (j, (column, value)) in self.columns.iter().zip(row).enumerate() {
                if j > 0 {
                    text.push(',');
                }
                // Built by hand to keep the keys in column order.
                let _ = write!(
                    text,
                    "{}:{}",
                    serde_json::Value::String(column.clone()),
                    value.to_json()
                );
            }
            text.push('}');
        }
        text.push_str("]\n");
        text
    }
}

fn column_values(array: &dyn Array, options: &FormatOptions) -> Result<Vec<Value>, ArrowError> {
    use arrow::array::AsArray as _;
    use arrow::datatypes as t;
    let n = array.len();
    let pick = |f: &dyn Fn(usize) -> Value| -> Vec<Value> {
        (0..n)
            .map(|i| if array.is_null(i) { Value::Null } else { f(i) })
            .collect()
    };
    Ok(match array.data_type() {
        DataType::Boolean => pick(&|i| Value::Bool(array.as_boolean().value(i))),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let ints = arrow::compute::cast(array, &DataType::Int64)?;
            let ints = ints.as_primitive::<t::Int64Type>();
            pick(&|i| Value::Int(ints.value(i)))
        }
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            let ints = arrow::compute::cast(array, &DataType::UInt64)?;
            let ints = ints.as_primitive::<t::UInt64Type>();
            pick(&|i| Value::UInt(ints.value(i)))
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            let floats = arrow::compute::cast(array, &DataType::Float64)?;
            let floats = floats.as_primitive::<t::Float64Type>();
            pick(&|i| Value::Float(floats.value(i)))
        }
        DataType::Utf8 => pick(&|i| Value::Text(array.as_string::<i32>().value(i).to_string())),
        DataType::LargeUtf8 => {
            pick(&|i| Value::Text(array.as_string::<i64>().value(i).to_string()))
        }
        DataType::Utf8View => pick(&|i| Value::Text(array.as_string_view().value(i).to_string())),
        _ => {
            let formatter = ArrayFormatter::try_new(array, options)?;
            pick(&|i| Value::Text(formatter.value(i).to_string()))
        }
    })
}

/// Decimals a float column shows: none when every value is whole, two for values of 1 or more,
/// four below (tiny values print in scientific notation whatever this says).
fn float_decimals<'a>(values: impl IntoIterator<Item = &'a Value>) -> usize {
    let floats: Vec<f64> = values
        .into_iter()
        .filter_map(|v| match v {
            Value::Float(f) if f.is_finite() => Some(*f),
            _ => None,
        })
        .collect();
    // Sums of floats land a hair off whole numbers (0.9999999999 for an epsilon of 1).
    if floats.iter().all(|f| (f - f.round()).abs() < 1e-6) {
        0
    } else if floats.iter().any(|f| f.abs() >= 1.0) {
        2
    } else {
        4
    }
}

/// Text with its control characters (C0, DEL, C1) shown as escapes, `\n` kept: journal fields
/// hold text other principals wrote (a query's comment, a guest's log line), which must not
/// move an auditor's cursor or rewrite what the terminal shows.
fn visible(text: &str) -> String {
    if !text.chars().any(|c| c.is_control() && c != '\n') {
        return text.to_string();
    }
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn for_people(value: &Value, decimals: usize, style: Style) -> String {
    let text = match value {
        Value::Null => String::new(),
        Value::Float(f) if *f != 0.0 && f.abs() < 1e-4 => format!("{f:.1e}"),
        Value::Float(f) => format!("{f:.decimals$}"),
        Value::Time(t) => local(*t),
        Value::List(items) => items.join(", "),
        other => other.to_plain(),
    };
    let text = visible(&text);
    if style.wide {
        text
    } else {
        cut(&text.replace('\n', " "))
    }
}

/// Items joined with `, `, in lines of at most [`CELL_WIDTH`] characters (an item longer than
/// that has a line of its own).
fn wrap(items: &[String]) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() {
            format!("{item},")
        } else {
            item.clone()
        };
        if !line.is_empty() && line.chars().count() + 1 + piece.chars().count() > CELL_WIDTH {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&piece);
    }
    lines.push(line);
    lines.join("\n")
}

/// Text cut to [`CELL_WIDTH`] characters, the cut marked with `…`.
fn cut(text: &str) -> String {
    if text.chars().count() <= CELL_WIDTH {
        return text.to_string();
    }
    let mut kept: String = text.chars().take(CELL_WIDTH - 1).collect();
    kept.push('…');
    kept
}

/// "1 row", "2 rows".
pub fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".to_string()
    } else {
        format!("{n} rows")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut table = Table::new(&["name", "amount", "when", "tags"]);
        table.push(vec![
            Value::text("a, \"quoted\""),
            Value::Float(10919.229124236252),
            Value::Time(0),
            Value::List(vec!["x".into(), "y".into()]),
        ]);
        table.push(vec![
            Value::Null,
            Value::Float(2.5),
            Value::time(1_700_000_000),
            Value::List(vec![]),
        ]);
        table
    }

    #[test]
    fn table_rounds_to_the_column_and_aligns_numbers() {
        let text = sample().render(Format::Table, Style::default());
        assert!(text.contains("10919.23"), "{text}");
        assert!(text.contains("    2.50 |"), "{text}");
        assert!(!text.contains("10919.229"), "{text}");
    }

    #[test]
    fn csv_and_json_keep_full_precision_and_utc() {
        let csv = sample().render(Format::Csv, Style::default());
        assert!(csv.starts_with("name,amount,when,tags\n"), "{csv}");
        assert!(csv.contains("\"a, \"\"quoted\"\"\",10919.229124236252,1970-01-01T00:00:00Z,x;y"));
        assert!(csv.contains(",2.5,2023-11-14T22:13:20Z,"), "{csv}");
        let json: serde_json::Value =
            serde_json::from_str(&sample().render(Format::Json, Style::default())).unwrap();
        assert_eq!(json[0]["amount"], 10919.229124236252);
        assert_eq!(json[0]["tags"], serde_json::json!(["x", "y"]));
        assert_eq!(json[1]["name"], serde_json::Value::Null);
        assert_eq!(json[1]["when"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn an_empty_table_says_so_and_json_is_an_empty_array() {
        let table = Table::new(&["a"]);
        assert!(
            table
                .render(Format::Table, Style::default())
                .ends_with("(no rows)\n")
        );
        assert_eq!(table.render(Format::Json, Style::default()), "[]\n");
        assert_eq!(table.render(Format::Csv, Style::default()), "a\n");
    }

    #[test]
    fn long_text_is_cut_with_a_marker_unless_wide() {
        let mut table = Table::new(&["query"]);
        table.push(vec![Value::text("x".repeat(100))]);
        let cut = table.render(Format::Table, Style::default());
        assert!(
            cut.contains(&format!("{}…", "x".repeat(CELL_WIDTH - 1))),
            "{cut}"
        );
        assert!(!cut.contains(&"x".repeat(CELL_WIDTH)));
        let whole = table.render(Format::Table, Style { wide: true });
        assert!(whole.contains(&"x".repeat(100)));
    }

    #[test]
    fn a_record_prints_as_fields() {
        let record = Table::record(vec![
            ("principal", Value::text("bank")),
            ("roles", Value::List(vec!["consumer".into()])),
        ]);
        let text = record.render(Format::Table, Style::default());
        assert_eq!(text, "principal:  bank\nroles:      consumer\n");
        assert_eq!(
            record.render(Format::Json, Style::default()),
            "[{\"principal\":\"bank\",\"roles\":[\"consumer\"]}]\n"
        );
    }

    #[test]
    fn a_long_list_in_a_record_wraps_whole() {
        let items: Vec<String> = (0..40).map(|i| format!("Call{i}")).collect();
        let text = Table::record(vec![("may_call", Value::List(items.clone()))])
            .render(Format::Table, Style::default());
        assert!(text.lines().count() > 1, "{text}");
        assert!(
            text.lines().all(|l| l.chars().count() <= CELL_WIDTH + 12),
            "{text}"
        );
        for item in &items {
            assert!(text.contains(item.as_str()), "{item} in {text}");
        }
        assert!(!text.contains('…'), "{text}");
    }

    /// Regression (fresh-attacker round of issue 18): a query's comment drew over the principal
    /// column of an owner's audit table with terminal escapes.
    #[test]
    fn control_characters_are_shown_not_obeyed() {
        let mut table = Table::new(&["principal", "query"]);
        table.push(vec![
            Value::text("bank"),
            Value::text("SELECT /*\u{1b}7\u{1b}[9Ganalyst\r\u{9b}2J*/ 1"),
        ]);
        for format in [Format::Table, Format::Csv] {
            let text = table.render(format, Style::default());
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
            assert!(text.contains("\\u{1b}[9Ganalyst\\r"), "{text}");
        }
        let json = table.render(Format::Json, Style::default());
        assert!(!json.contains('\u{1b}'), "{json:?}");
        let record = Table::record(vec![("q", Value::text("a\u{1b}[2Jb"))]);
        assert!(
            !record
                .render(Format::Table, Style::default())
                .contains('\u{1b}')
        );
    }

    #[test]
    fn plural() {
        assert_eq!(rows(1), "1 row");
        assert_eq!(rows(0), "0 rows");
    }
}
