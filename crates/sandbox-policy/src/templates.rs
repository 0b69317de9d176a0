//! Approved SQL templates: a named, parameterized query a consumer submits and every owner of the
//! data it reads approves, bound to the SHA-256 of its definition. Running one binds typed
//! parameters; the query still passes the guard and the release gate, under the template's own
//! mode (aggregate with its own `min_units`, or scoring for consented entities with an output
//! contract) instead of the consumer's ad-hoc grant.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::records::Contract;

/// The type of a template parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    Int,
    Float,
    String,
    /// A month, `YYYY-MM` (bound as text, compared with the datasets' month columns).
    Month,
}

impl ParamKind {
    /// The name a template declares it by (`type = "..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Int => "int",
            ParamKind::Float => "float",
            ParamKind::String => "string",
            ParamKind::Month => "month",
        }
    }

    /// What a value of the kind looks like, for messages.
    fn in_words(self) -> &'static str {
        match self {
            ParamKind::Int => "an integer",
            ParamKind::Float => "a number",
            ParamKind::String => "text",
            ParamKind::Month => "a month (YYYY-MM)",
        }
    }
}

/// One declared parameter; the SQL refers to it as `$name`. Every parameter has a domain the
/// owners approve with the SQL (it is part of the template's hash): an enumeration of `values`,
/// a `min`/`max` range of numbers, or a `from`/`to` range of months moving in `step_months`.
/// A free parameter would let a consumer narrow an approved window or group to one period or
/// one entity (THREATS class 30).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamKind,
    /// The values it may take, as text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Bounds of a number parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// The first and last month a month parameter may take (`YYYY-MM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// A month parameter takes every `step_months`-th month from `from` (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_months: Option<u32>,
}

/// The least step of a month parameter in a scoring (per-entity) template: two runs with
/// different values subtract to a window of at least this many months, never to one month of
/// one entity.
pub const MIN_SCORING_STEP_MONTHS: u32 = 12;

/// A `YYYY-MM` month as a count of months, or `None` when it is not one.
pub fn month_index(text: &str) -> Option<u32> {
    let (year, month) = text.split_once('-')?;
    // Digits only: `parse` would take a sign (`2023-+4`), and the value is bound as written.
    if year.len() != 4
        || month.len() != 2
        || !year
            .bytes()
            .chain(month.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let (year, month): (u32, u32) = (year.parse().ok()?, month.parse().ok()?);
    (1..=12).contains(&month).then_some(year * 12 + month - 1)
}

impl TemplateParam {
    /// Checks the declared domain: one, of the parameter's kind, not empty.
    fn check_domain(&self, scoring: bool) -> Result<(), String> {
        let name = &self.name;
        let ranged = self.min.is_some() || self.max.is_some();
        let months = self.from.is_some() || self.to.is_some() || self.step_months.is_some();
        let declared =
            usize::from(!self.values.is_empty()) + usize::from(ranged) + usize::from(months);
        if declared != 1 {
            return Err(format!(
                "parameter `{name}` declares a domain: `values`, or `min` and `max`, or `from` \
                 and `to` (months)"
            ));
        }
        if !self.values.is_empty() {
            for value in &self.values {
                self.parse(value).ok_or_else(|| {
                    format!("parameter `{name}`: `{value}` is not a {:?}", self.kind)
                })?;
            }
            return Ok(());
        }
        if scoring {
            let stepped = self.kind == ParamKind::Month
                && self.step_months.unwrap_or(1) >= MIN_SCORING_STEP_MONTHS;
            if !stepped {
                return Err(format!(
                    "parameter `{name}` of a per-entity template must take listed `values` or \
                     months `step_months` of at least {MIN_SCORING_STEP_MONTHS} apart: two runs \
                     must never subtract to a narrower window of one entity"
                ));
            }
        }
        match self.kind {
            ParamKind::Int | ParamKind::Float if ranged => match (self.min, self.max) {
                (Some(min), Some(max)) if min.is_finite() && max.is_finite() && min <= max => {
                    Ok(())
                }
                _ => Err(format!(
                    "parameter `{name}`: `min` and `max` are two numbers, min <= max"
                )),
            },
            ParamKind::Month if months => {
                let from = self.from.as_deref().and_then(month_index);
                let to = self.to.as_deref().and_then(month_index);
                match (from, to, self.step_months) {
                    (Some(from), Some(to), step) if from <= to && step != Some(0) => Ok(()),
                    _ => Err(format!(
                        "parameter `{name}`: `from` and `to` are months `YYYY-MM`, from <= to, \
                         and `step_months` is positive"
                    )),
                }
            }
            _ => Err(format!(
                "parameter `{name}`: a {:?} takes `values`{}",
                self.kind,
                match self.kind {
                    ParamKind::Int | ParamKind::Float => " or `min` and `max`",
                    ParamKind::Month => " or `from` and `to`",
                    ParamKind::String => "",
                }
            )),
        }
    }

    /// A value parsed to the parameter's type, without the domain check.
    fn parse(&self, value: &str) -> Option<ParamValue> {
        match self.kind {
            ParamKind::Int => value.trim().parse().map(ParamValue::Int).ok(),
            ParamKind::Float => value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(ParamValue::Float),
            ParamKind::String => Some(ParamValue::String(value.to_string())),
            ParamKind::Month => month_index(value).map(|_| ParamValue::String(value.to_string())),
        }
    }

    /// Whether a parsed value lies in the declared domain.
    fn admits(&self, text: &str, value: &ParamValue) -> bool {
        if !self.values.is_empty() {
            return self
                .values
                .iter()
                .any(|allowed| self.parse(allowed).as_ref() == Some(value));
        }
        match (value, self.kind) {
            (ParamValue::Int(v), _) => {
                let v = *v as f64;
                self.min.is_some_and(|m| v >= m) && self.max.is_some_and(|m| v <= m)
            }
            (ParamValue::Float(v), _) => {
                self.min.is_some_and(|m| *v >= m) && self.max.is_some_and(|m| *v <= m)
            }
            (ParamValue::String(_), ParamKind::Month) => {
                let (Some(v), Some(from), Some(to)) = (
                    month_index(text),
                    self.from.as_deref().and_then(month_index),
                    self.to.as_deref().and_then(month_index),
                ) else {
                    return false;
                };
                let step = self.step_months.unwrap_or(1).max(1);
                (from..=to).contains(&v) && (v - from) % step == 0
            }
            (ParamValue::String(_), _) => false,
        }
    }

    /// The domain its owners approve, in words: `one of 2023-01, 2024-01`, `from 1 to 100`,
    /// `months from 2023-01 to 2024-12 every 12` (`months from .. to ..` when every month is).
    /// Listings show it; refusals of a value quote it.
    pub fn domain_in_words(&self) -> String {
        if !self.values.is_empty() {
            return format!("one of {}", self.values.join(", "));
        }
        let unset = || "?".to_string();
        match self.kind {
            ParamKind::Month => {
                let months = format!(
                    "months from {} to {}",
                    self.from.clone().unwrap_or_else(unset),
                    self.to.clone().unwrap_or_else(unset)
                );
                match self.step_months.unwrap_or(1) {
                    1 => months,
                    step => format!("{months} every {step}"),
                }
            }
            _ => format!(
                "from {} to {}",
                self.min.map_or_else(unset, |m| m.to_string()),
                self.max.map_or_else(unset, |m| m.to_string())
            ),
        }
    }

    /// What a value must be: its type and its domain, in words.
    fn expected(&self) -> String {
        format!("{}, {}", self.kind.in_words(), self.domain_in_words())
    }
}

/// Why a run's parameter values are refused. All but [`ParamError::OutsideDomain`] are malformed
/// requests (nothing a policy decided); a well-formed value outside the approved domain is the
/// owners' refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    /// A parameter the template does not declare.
    Unknown {
        template: String,
        name: String,
        declared: Vec<String>,
    },
    /// A declared parameter without a value.
    Missing { name: String, expected: String },
    /// A value longer than [`MAX_PARAM_BYTES`] (not quoted back).
    TooLong { name: String, bytes: usize },
    /// A value that does not parse as the declared type.
    Malformed {
        name: String,
        given: String,
        expected: String,
    },
    /// A well-formed value outside the domain the owners approved.
    OutsideDomain {
        name: String,
        given: String,
        domain: String,
    },
}

impl ParamError {
    /// The parameter it is about.
    pub fn parameter(&self) -> &str {
        match self {
            ParamError::Unknown { name, .. }
            | ParamError::Missing { name, .. }
            | ParamError::TooLong { name, .. }
            | ParamError::Malformed { name, .. }
            | ParamError::OutsideDomain { name, .. } => name,
        }
    }

    /// Whether the request itself is at fault (a value of the wrong type, a missing or unknown
    /// parameter) rather than the owners' domain.
    pub fn is_malformed(&self) -> bool {
        !matches!(self, ParamError::OutsideDomain { .. })
    }
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamError::Unknown {
                template,
                name,
                declared,
            } => write!(
                f,
                "template `{template}` has no parameter `{}` (its parameters: {})",
                name.escape_debug(),
                if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                }
            ),
            ParamError::Missing { name, expected } => {
                write!(f, "parameter `{name}` needs a value: {expected}")
            }
            ParamError::TooLong { name, bytes } => write!(
                f,
                "parameter `{name}`: the value given is {bytes} bytes; the limit is                  {MAX_PARAM_BYTES}"
            ),
            ParamError::Malformed {
                name,
                given,
                expected,
            } => write!(
                f,
                "parameter `{name}`: `{}` is not a valid value; expected {expected}",
                given.escape_debug()
            ),
            ParamError::OutsideDomain {
                name,
                given,
                domain,
            } => write!(
                f,
                "parameter `{name}`: `{}` is outside the domain its owners approved: {domain}",
                given.escape_debug()
            ),
        }
    }
}

impl std::error::Error for ParamError {}

/// A parameter value, parsed to its declared type.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    String(String),
}

/// What a template releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum TemplateOutput {
    /// Aggregate rows, each covering at least `min_units` distinct privacy units.
    Aggregate { min_units: u64 },
    /// One row per consented entity, within the contract.
    Scoring { contract: Contract },
}

/// A template as submitted. Its SHA-256 is over [`TemplateDefinition::canonical_bytes`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateDefinition {
    pub name: String,
    pub description: String,
    pub sql: String,
    pub params: Vec<TemplateParam>,
    pub output: TemplateOutput,
}

/// Most parameters a template may declare.
pub const MAX_TEMPLATE_PARAMS: usize = 16;
/// Longest parameter value, in bytes.
pub const MAX_PARAM_BYTES: usize = 256;

/// TOML form of a template (`sandbox template submit FILE`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    #[serde(default)]
    description: String,
    sql: String,
    mode: String,
    min_units: Option<u64>,
    #[serde(default)]
    param: Vec<TemplateParam>,
    contract: Option<toml::Value>,
}

impl TemplateDefinition {
    /// Parses and validates a template written in TOML.
    pub fn from_toml(text: &str) -> Result<TemplateDefinition, String> {
        let raw: RawTemplate = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let output = match (raw.mode.as_str(), raw.min_units, raw.contract) {
            ("aggregate", Some(min_units), None) => TemplateOutput::Aggregate { min_units },
            ("scoring", None, Some(contract)) => {
                let text = toml::to_string(&contract).map_err(|e| e.to_string())?;
                TemplateOutput::Scoring {
                    contract: Contract::from_toml(&text).map_err(|e| format!("contract: {e}"))?,
                }
            }
            ("aggregate", _, _) => {
                return Err("an aggregate template sets `min_units` and no `[contract]`".into());
            }
            ("scoring", _, _) => {
                return Err("a scoring template has a `[contract]` and no `min_units`".into());
            }
            (other, _, _) => {
                return Err(format!(
                    "unknown mode `{other}` (expected aggregate or scoring)"
                ));
            }
        };
        let definition = TemplateDefinition {
            name: raw.name,
            description: raw.description,
            sql: raw.sql,
            params: raw.param,
            output,
        };
        definition.validate()?;
        Ok(definition)
    }

    /// Names are identifiers, parameters are few and distinct, thresholds are real.
    pub fn validate(&self) -> Result<(), String> {
        let identifier = |s: &str| {
            let mut chars = s.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && s.len() <= 64
        };
        if !identifier(&self.name) {
            return Err(format!(
                "template name `{}` must be a lowercase identifier",
                self.name
            ));
        }
        if self.sql.trim().is_empty() {
            return Err("the template has no SQL".into());
        }
        if self.params.len() > MAX_TEMPLATE_PARAMS {
            return Err(format!("at most {MAX_TEMPLATE_PARAMS} parameters"));
        }
        let mut seen = std::collections::BTreeSet::new();
        let scoring = matches!(self.output, TemplateOutput::Scoring { .. });
        for param in &self.params {
            if !identifier(&param.name) || !seen.insert(param.name.as_str()) {
                return Err(format!(
                    "parameter `{}` must be a distinct lowercase identifier",
                    param.name
                ));
            }
            param.check_domain(scoring)?;
        }
        match &self.output {
            TemplateOutput::Aggregate { min_units } if *min_units < 2 => {
                Err(format!("min_units must be at least 2, got {min_units}"))
            }
            TemplateOutput::Aggregate { .. } => Ok(()),
            TemplateOutput::Scoring { contract } => contract.validate(),
        }
    }

    /// The bytes a template's SHA-256 is computed over: the submitting org, then the
    /// definition's JSON form (field order fixed by the type). The org is part of it so that
    /// approvals given to one consumer's template never cover another's identical submission.
    pub fn canonical_bytes(&self, org: &str) -> Vec<u8> {
        let mut bytes = format!("{org}\0").into_bytes();
        bytes.extend(serde_json::to_vec(self).expect("a template always serializes"));
        bytes
    }

    /// Parses the caller's values by the declared types. Every declared parameter needs a value
    /// and no other may be given. Every value is parsed before any is checked against its
    /// domain, so a malformed request is always refused as one, whatever else it holds.
    pub fn bind(
        &self,
        values: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, ParamValue>, ParamError> {
        if let Some(unknown) = values
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            let name = if unknown.len() > MAX_PARAM_BYTES {
                format!("{}...", unknown.chars().take(32).collect::<String>())
            } else {
                unknown.clone()
            };
            return Err(ParamError::Unknown {
                template: self.name.clone(),
                name,
                declared: self.params.iter().map(|p| p.name.clone()).collect(),
            });
        }
        let mut parsed = Vec::with_capacity(self.params.len());
        for param in &self.params {
            let value = values.get(&param.name).ok_or_else(|| ParamError::Missing {
                name: param.name.clone(),
                expected: param.expected(),
            })?;
            if value.len() > MAX_PARAM_BYTES {
                return Err(ParamError::TooLong {
                    name: param.name.clone(),
                    bytes: value.len(),
                });
            }
            let typed = param.parse(value).ok_or_else(|| ParamError::Malformed {
                name: param.name.clone(),
                given: value.clone(),
                expected: param.expected(),
            })?;
            parsed.push((param, value, typed));
        }
        let mut bound = BTreeMap::new();
        for (param, value, typed) in parsed {
            if !param.admits(value, &typed) {
                return Err(ParamError::OutsideDomain {
                    name: param.name.clone(),
                    given: value.clone(),
                    domain: param.domain_in_words(),
                });
            }
            bound.insert(param.name.clone(), typed);
        }
        Ok(bound)
    }
}

/// A submitted template, with the datasets its SQL reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub sha256: String,
    pub definition: TemplateDefinition,
    pub datasets: Vec<String>,
    pub org: String,
    pub submitted_by: String,
    pub submitted_at: u64,
}

/// One owner's approval of a template, for the datasets it owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateApproval {
    pub sha256: String,
    pub org: String,
    pub approved_by: String,
    pub datasets: Vec<String>,
    pub max_runs: u64,
    pub expires_at: u64,
    pub approved_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGGREGATE: &str = r#"
name = "risk_by_industry"
sql = "SELECT industry, COUNT(*) FROM enterprises WHERE status = $status GROUP BY industry"
mode = "aggregate"
min_units = 20
[[param]]
name = "status"
type = "string"
values = ["active", "a", "suspended"]
"#;

    #[test]
    fn months_are_four_digits_a_dash_and_two() {
        assert_eq!(month_index("2023-01"), Some(2023 * 12));
        assert_eq!(month_index("2024-12"), Some(2024 * 12 + 11));
        for bad in [
            "2023-+4", "+023-01", "2023-1", "2023-13", "2023-00", "23-01", "2023/01", "",
        ] {
            assert_eq!(month_index(bad), None, "{bad}");
        }
    }

    #[test]
    fn templates_parse_hash_stably_and_bind_typed_values() {
        let t = TemplateDefinition::from_toml(AGGREGATE).unwrap();
        assert_eq!(t.output, TemplateOutput::Aggregate { min_units: 20 });
        assert_eq!(t.canonical_bytes("bank"), t.clone().canonical_bytes("bank"));
        assert_ne!(t.canonical_bytes("bank"), t.canonical_bytes("other"));
        let bound = t
            .bind(&BTreeMap::from([("status".into(), "active".into())]))
            .unwrap();
        assert_eq!(bound["status"], ParamValue::String("active".into()));
        let missing = t.bind(&BTreeMap::new()).unwrap_err();
        assert!(missing.is_malformed());
        assert_eq!(
            missing.to_string(),
            "parameter `status` needs a value: text, one of active, a, suspended"
        );
        let unknown = t
            .bind(&BTreeMap::from([
                ("status".into(), "a".into()),
                ("x".into(), "1".into()),
            ]))
            .unwrap_err();
        assert!(unknown.is_malformed());
        assert_eq!(
            unknown.to_string(),
            "template `risk_by_industry` has no parameter `x` (its parameters: status)"
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        for (text, needle) in [
            (
                AGGREGATE.replace("min_units = 20", "min_units = 1"),
                "at least 2",
            ),
            (AGGREGATE.replace("min_units = 20", ""), "sets `min_units`"),
            (
                AGGREGATE.replace("\"aggregate\"", "\"raw\""),
                "unknown mode",
            ),
            (
                AGGREGATE.replace("risk_by_industry", "Risk"),
                "lowercase identifier",
            ),
            (
                AGGREGATE.replace("\"string\"", "\"date\""),
                "unknown variant",
            ),
        ] {
            let error = TemplateDefinition::from_toml(&text).unwrap_err();
            assert!(error.contains(needle), "{error} lacks {needle}");
        }
        let int =
            TemplateDefinition::from_toml(&AGGREGATE.replace("\"string\"", "\"int\"").replace(
                "values = [\"active\", \"a\", \"suspended\"]",
                "min = 1\nmax = 5",
            ))
            .unwrap();
        let malformed = int
            .bind(&BTreeMap::from([("status".into(), "x".into())]))
            .unwrap_err();
        assert!(malformed.is_malformed());
        assert_eq!(
            malformed.to_string(),
            "parameter `status`: `x` is not a valid value; expected an integer, from 1 to 5"
        );
        let outside = int
            .bind(&BTreeMap::from([("status".into(), "9".into())]))
            .unwrap_err();
        assert!(!outside.is_malformed());
        assert_eq!(
            outside.to_string(),
            "parameter `status`: `9` is outside the domain its owners approved: from 1 to 5"
        );
    }

    /// Every value is parsed before any is checked against its domain: a request with a
    /// malformed value is refused as malformed even when an earlier value is outside its domain.
    #[test]
    fn malformed_values_are_found_before_domains() {
        let two =
            format!("{AGGREGATE}\n[[param]]\nname = \"level\"\ntype = \"int\"\nmin = 1\nmax = 3\n");
        let t = TemplateDefinition::from_toml(&two).unwrap();
        let error = t
            .bind(&BTreeMap::from([
                ("status".into(), "revoked".into()),
                ("level".into(), "high".into()),
            ]))
            .unwrap_err();
        assert!(error.is_malformed(), "{error}");
        assert_eq!(error.parameter(), "level");
        let error = t
            .bind(&BTreeMap::from([
                ("status".into(), "revoked".into()),
                ("level".into(), "2".into()),
            ]))
            .unwrap_err();
        assert!(!error.is_malformed(), "{error}");
        assert_eq!(error.parameter(), "status");
    }

    /// A parameter outside its approved domain is refused; a per-entity template cannot declare
    /// a window that moves by less than a year, nor a free parameter.
    #[test]
    fn parameters_stay_in_their_approved_domains() {
        let free = AGGREGATE.replace("values = [\"active\", \"a\", \"suspended\"]\n", "");
        assert!(
            TemplateDefinition::from_toml(&free)
                .unwrap_err()
                .contains("declares a domain")
        );
        let t = TemplateDefinition::from_toml(AGGREGATE).unwrap();
        assert_eq!(
            t.bind(&BTreeMap::from([("status".into(), "revoked".into())])),
            Err(ParamError::OutsideDomain {
                name: "status".into(),
                given: "revoked".into(),
                domain: "one of active, a, suspended".into()
            })
        );
        let scoring = |param: &str| {
            format!(
                r#"
name = "features"
sql = "SELECT credit_code FROM tax_monthly WHERE month >= $since GROUP BY credit_code"
mode = "scoring"
[[param]]
name = "since"
{param}
[contract]
purpose = "credit_assessment"
key = "credit_code"
max_rows = 10
[[contract.field]]
name = "n"
type = "int"
min = 0
max = 1
"#
            )
        };
        let monthly = scoring("type = \"month\"\nfrom = \"2023-01\"\nto = \"2024-12\"");
        assert!(
            TemplateDefinition::from_toml(&monthly)
                .unwrap_err()
                .contains("at least 12 apart")
        );
        let yearly = TemplateDefinition::from_toml(&scoring(
            "type = \"month\"\nfrom = \"2023-01\"\nto = \"2024-01\"\nstep_months = 12",
        ))
        .unwrap();
        assert_eq!(
            yearly.params[0].domain_in_words(),
            "months from 2023-01 to 2024-01 every 12"
        );
        // Each value: bound, refused as outside the domain, or refused as malformed.
        for (value, outcome) in [
            ("2023-01", None),
            ("2024-01", None),
            ("2024-12", Some(false)),
            ("2023-02", Some(false)),
            ("x", Some(true)),
            ("garbage", Some(true)),
            ("2023-1", Some(true)),
        ] {
            let bound = yearly.bind(&BTreeMap::from([("since".into(), value.into())]));
            assert_eq!(
                bound.as_ref().err().map(ParamError::is_malformed),
                outcome,
                "{value}: {bound:?}"
            );
        }
        let garbage = yearly
            .bind(&BTreeMap::from([("since".into(), "garbage".into())]))
            .unwrap_err();
        assert_eq!(
            garbage.to_string(),
            "parameter `since`: `garbage` is not a valid value; expected a month (YYYY-MM), \
             months from 2023-01 to 2024-01 every 12"
        );
    }
}
