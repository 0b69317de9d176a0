//! SQL over the demo schema from fuzz bytes: mostly the shapes analysts write (grouped aggregates,
//! joins on the privacy unit, filters, HAVING, ORDER BY, LIMIT, derived tables), mixed with what
//! the guard must refuse (identifiers and measures in the output, cross joins, joins on other
//! columns, functions, CASE, subqueries), so both sides of every rule are exercised.

use arbitrary::{Result, Unstructured};
use sandbox_policy::{PolicySet, Principal, Role};

/// The tables and visible columns a generator draws from.
#[derive(Debug, Clone)]
pub struct Schema {
    pub tables: Vec<Table>,
    /// Tables drawn rarely (one not granted, to exercise that refusal).
    pub rare: Vec<Table>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    pub unit: String,
    pub columns: Vec<(String, Role)>,
}

impl Schema {
    /// Every dataset of the policy with its visible (non-hidden) columns, in a stable order.
    pub fn from_policy(policy: &PolicySet) -> Self {
        Self::of(policy, |_| true)
    }

    /// The datasets granted to `principal`, and one that is not (so that refusal is drawn too).
    pub fn granted(policy: &PolicySet, principal: &Principal) -> Self {
        let granted: Vec<String> = policy
            .granted_datasets(principal)
            .map(|d| d.id.clone())
            .collect();
        let other = policy
            .datasets
            .keys()
            .filter(|id| !granted.contains(id))
            .min()
            .cloned();
        let mut schema = Self::of(policy, |id| granted.iter().any(|g| g == id));
        schema.rare = Self::of(policy, |id| other.as_deref() == Some(id)).tables;
        schema
    }

    fn of(policy: &PolicySet, include: impl Fn(&str) -> bool) -> Self {
        let mut tables: Vec<Table> = policy
            .datasets
            .values()
            .filter(|d| include(&d.id))
            .map(|d| Table {
                name: d.id.clone(),
                unit: d.privacy_unit.clone(),
                columns: d
                    .columns
                    .iter()
                    .filter(|c| c.role != Role::Hidden)
                    .map(|c| (c.name.clone(), c.role))
                    .collect(),
            })
            .collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        Schema {
            tables,
            rare: Vec::new(),
        }
    }
}

/// A column of a table in scope, qualified by the table's alias.
#[derive(Debug, Clone)]
struct Column {
    qualified: String,
    role: Role,
}

/// Weighted towards what grants allow (COUNT, SUM, AVG); MIN and MAX are usually refused.
const AGGREGATES: [&str; 9] = [
    "COUNT",
    "COUNT",
    "SUM",
    "SUM",
    "AVG",
    "AVG",
    "MIN",
    "MAX",
    "COUNT(DISTINCT",
];
const FUNCTIONS: [&str; 6] = ["upper", "lower", "length", "abs", "round", "substr"];
const COMPARISONS: [&str; 6] = ["=", "<>", "<", "<=", ">", ">="];

/// One query from the bytes. Never fails for lack of bytes: choices default to the first option.
pub fn query(u: &mut Unstructured<'_>, schema: &Schema) -> Result<String> {
    let depth = if u.ratio(1, 6)? { 1 } else { 0 };
    select(u, schema, depth)
}

fn select(u: &mut Unstructured<'_>, schema: &Schema, derived: u32) -> Result<String> {
    if schema.tables.is_empty() {
        return Ok("SELECT 1".into());
    }
    let base = pick_table(u, schema)?;
    let mut from = format!("{} t0", base.name);
    let mut columns = qualified(&base, "t0");
    if u.ratio(1, 3)? {
        let other = pick_table(u, schema)?;
        let other_columns = qualified(&other, "t1");
        match u.int_in_range(0..=9)? {
            // A cross join: always refused.
            0 => from.push_str(&format!(", {} t1", other.name)),
            // A join on some pair of columns: mostly refused.
            1..=2 => {
                let left = u.choose(&columns)?.qualified.clone();
                let right = u.choose(&other_columns)?.qualified.clone();
                from.push_str(&format!(" JOIN {} t1 ON {left} = {right}", other.name));
            }
            // On the privacy units: the join analysts make.
            _ => {
                let kind = if u.ratio(1, 4)? { "LEFT JOIN" } else { "JOIN" };
                from.push_str(&format!(
                    " {kind} {} t1 ON t0.{} = t1.{}",
                    other.name, base.unit, other.unit
                ));
            }
        }
        columns.extend(other_columns);
    }

    let dimensions: Vec<&Column> = columns
        .iter()
        .filter(|c| c.role == Role::Dimension)
        .collect();
    let mut groups: Vec<String> = Vec::new();
    for _ in 0..u.int_in_range(0..=2)? {
        // Mostly dimensions; sometimes any column (identifiers, measures, masked).
        let column = if !dimensions.is_empty() && u.ratio(4, 5)? {
            u.choose(&dimensions)?.qualified.clone()
        } else {
            u.choose(&columns)?.qualified.clone()
        };
        if !groups.contains(&column) {
            groups.push(column);
        }
    }
    let mut items: Vec<String> = groups.clone();
    for i in 0..u.int_in_range(1..=3)? {
        items.push(format!("{} AS a{i}", aggregate(u, &columns)?));
    }
    if u.ratio(1, 12)? {
        // A bare column that is not grouped on.
        items.push(u.choose(&columns)?.qualified.clone());
    }
    let mut sql = format!("SELECT {} FROM {from}", items.join(", "));
    if u.ratio(1, 2)? {
        sql.push_str(&format!(
            " WHERE {}",
            predicate(u, &columns, &base.name, 0)?
        ));
    }
    if !groups.is_empty() && u.ratio(9, 10)? {
        sql.push_str(&format!(" GROUP BY {}", groups.join(", ")));
    }
    if u.ratio(1, 6)? {
        let threshold = u.int_in_range(0..=50)?;
        sql.push_str(&format!(" HAVING COUNT(*) > {threshold}"));
    }
    if u.ratio(1, 3)? {
        let key = u.int_in_range(1..=items.len() as u32)?;
        let direction = if u.ratio(1, 2)? { "DESC" } else { "ASC" };
        sql.push_str(&format!(" ORDER BY {key} {direction}"));
    }
    if u.ratio(1, 4)? {
        sql.push_str(&format!(" LIMIT {}", u.int_in_range(0..=20)?));
        if u.ratio(1, 3)? {
            sql.push_str(&format!(" OFFSET {}", u.int_in_range(0..=5)?));
        }
    }
    if derived > 0 && !groups.is_empty() {
        // An aggregate over the aggregated rows.
        let outer = groups[0].rsplit('.').next().unwrap_or("x").to_string();
        return Ok(format!(
            "SELECT {outer}, SUM(a0) AS total, COUNT(*) AS n FROM ({sql}) d GROUP BY {outer}"
        ));
    }
    Ok(sql)
}

fn pick_table(u: &mut Unstructured<'_>, schema: &Schema) -> Result<Table> {
    Ok(if !schema.rare.is_empty() && u.ratio(1, 25)? {
        u.choose(&schema.rare)?.clone()
    } else {
        u.choose(&schema.tables)?.clone()
    })
}

fn qualified(table: &Table, alias: &str) -> Vec<Column> {
    table
        .columns
        .iter()
        .map(|(name, role)| Column {
            qualified: format!("{alias}.{name}"),
            role: *role,
        })
        .collect()
}

fn aggregate(u: &mut Unstructured<'_>, columns: &[Column]) -> Result<String> {
    let function = *u.choose(&AGGREGATES)?;
    if function == "COUNT" && u.ratio(1, 2)? {
        return Ok("COUNT(*)".into());
    }
    let measures: Vec<&Column> = columns.iter().filter(|c| c.role == Role::Measure).collect();
    let argument = if !measures.is_empty() && u.ratio(5, 6)? {
        u.choose(&measures)?.qualified.clone()
    } else if measures.is_empty() && u.ratio(3, 4)? {
        return Ok("COUNT(*)".into());
    } else {
        u.choose(columns)?.qualified.clone()
    };
    let argument = if u.ratio(1, 10)? {
        format!("{argument} + 1")
    } else {
        argument
    };
    Ok(if function == "COUNT(DISTINCT" {
        format!("COUNT(DISTINCT {argument})")
    } else {
        format!("{function}({argument})")
    })
}

fn literal(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0..=4)? {
        0 => u.int_in_range(-5..=100_000i64)?.to_string(),
        1 => format!("{:.2}", f64::from(u.int_in_range(0..=1_000_000u32)?) / 7.0),
        2 => format!(
            "'{}'",
            u.choose(&["A", "C", "F", "2024-01", "active", "450100", "%a%"])?
        ),
        3 => "NULL".into(),
        _ => format!("'{}'", u.int_in_range(0..=99u32)?),
    })
}

fn predicate(
    u: &mut Unstructured<'_>,
    columns: &[Column],
    table: &str,
    depth: u32,
) -> Result<String> {
    let column = u.choose(columns)?.qualified.clone();
    Ok(match u.int_in_range(0..=8)? {
        0 | 1 => format!("{column} {} {}", u.choose(&COMPARISONS)?, literal(u)?),
        2 => {
            let values = (0..u.int_in_range(1..=4)?)
                .map(|_| literal(u))
                .collect::<Result<Vec<_>>>()?;
            format!("{column} IN ({})", values.join(", "))
        }
        3 => format!("{column} IS NOT NULL"),
        4 => format!("{column} LIKE {}", literal(u)?),
        5 => {
            let function = *u.choose(&FUNCTIONS)?;
            let call = if function == "substr" {
                format!("substr({column}, 1, {})", u.int_in_range(0..=4)?)
            } else {
                format!("{function}({column})")
            };
            format!("{call} = {}", literal(u)?)
        }
        6 => format!(
            "CASE WHEN {column} IS NULL THEN 0 ELSE 1 END = {}",
            u.int_in_range(0..=1)?
        ),
        7 if depth < 2 => format!(
            "({} {} {})",
            predicate(u, columns, table, depth + 1)?,
            if u.ratio(1, 2)? { "AND" } else { "OR" },
            predicate(u, columns, table, depth + 1)?
        ),
        7 => format!("NOT ({column} IS NULL)"),
        _ => {
            let bare = column.rsplit('.').next().unwrap_or(&column).to_string();
            format!(
                "{column} IN (SELECT {bare} FROM {table} LIMIT {})",
                u.int_in_range(1..=3)?
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn schema() -> Schema {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        Schema::from_policy(&sandbox_policy::load_dir(&dir).expect("policies"))
    }

    /// Generated queries parse, vary, and use the schema's tables; exhausted bytes still give
    /// a query.
    #[test]
    fn generated_queries_parse_and_vary() {
        let schema = schema();
        let mut distinct = std::collections::BTreeSet::new();
        let mut joins = 0;
        for seed in 0..500u32 {
            let bytes: Vec<u8> = (0..256u32)
                .map(|i| {
                    (seed
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i.wrapping_mul(40_503))
                        >> 13) as u8
                })
                .collect();
            let sql = query(&mut Unstructured::new(&bytes), &schema).expect("a query");
            DFParser::parse_sql(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(schema.tables.iter().any(|t| sql.contains(&t.name)), "{sql}");
            joins += usize::from(sql.contains("JOIN"));
            distinct.insert(sql);
        }
        assert!(
            distinct.len() > 400,
            "only {} distinct queries",
            distinct.len()
        );
        assert!(joins > 50, "only {joins} joins");
        let empty = query(&mut Unstructured::new(&[]), &schema).expect("a query from no bytes");
        DFParser::parse_sql(&empty).expect("parses");
    }
}
