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
}

/// One declared parameter; the SQL refers to it as `$name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateParam {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ParamKind,
}

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
        for param in &self.params {
            if !identifier(&param.name) || !seen.insert(param.name.as_str()) {
                return Err(format!(
                    "parameter `{}` must be a distinct lowercase identifier",
                    param.name
                ));
            }
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
    /// and no other may be given.
    pub fn bind(
        &self,
        values: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, ParamValue>, String> {
        if let Some(unknown) = values
            .keys()
            .find(|k| !self.params.iter().any(|p| &p.name == *k))
        {
            return Err(format!(
                "template `{}` has no parameter `{unknown}`",
                self.name
            ));
        }
        let mut bound = BTreeMap::new();
        for param in &self.params {
            let value = values.get(&param.name).ok_or_else(|| {
                format!(
                    "parameter `{}` ({:?}) needs a value",
                    param.name, param.kind
                )
            })?;
            if value.len() > MAX_PARAM_BYTES {
                return Err(format!(
                    "parameter `{}` is longer than {MAX_PARAM_BYTES} bytes",
                    param.name
                ));
            }
            let parsed = match param.kind {
                ParamKind::Int => value.trim().parse().map(ParamValue::Int).ok(),
                ParamKind::Float => value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(ParamValue::Float),
                ParamKind::String => Some(ParamValue::String(value.clone())),
            }
            .ok_or_else(|| format!("parameter `{}` is not a valid {:?}", param.name, param.kind))?;
            bound.insert(param.name.clone(), parsed);
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
"#;

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
        assert!(
            t.bind(&BTreeMap::new())
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            t.bind(&BTreeMap::from([
                ("status".into(), "a".into()),
                ("x".into(), "1".into())
            ]))
            .unwrap_err()
            .contains("no parameter `x`")
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
            TemplateDefinition::from_toml(&AGGREGATE.replace("\"string\"", "\"int\"")).unwrap();
        assert!(
            int.bind(&BTreeMap::from([("status".into(), "x".into())]))
                .unwrap_err()
                .contains("not a valid Int")
        );
    }
}
