//! Errors of the SQL path and the rules of the plan guard.

use std::fmt;

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;

/// A rule of the plan guard. The code is stable: clients, the journal and the policy suite use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Only one `SELECT` query; no DDL, DML, `COPY`, `SET`, `EXPLAIN` or `SHOW`.
    StatementNotQuery,
    /// The query text exceeds the length limit.
    QueryTooLong,
    /// A conversion of data values that could fail on some rows (added by type coercion, e.g.
    /// text compared with a number): whether the query fails would depend on hidden rows.
    CastMayFail,
    /// The query nests deeper than the parser's recursion limit, or its plan has more nodes or
    /// deeper expressions than the limits allow.
    QueryTooComplex,
    /// A table that is not a dataset granted to the caller.
    DatasetNotGranted,
    /// The dataset is granted, but not in aggregate mode.
    ModeNotGranted,
    /// The query does not aggregate, so it would release rows.
    AggregateRequired,
    /// A plan node the guard does not allow (window, union, distinct, values, ...).
    PlanNodeNotAllowed,
    /// A join without a condition (`FROM a, b` or `CROSS JOIN`).
    CrossJoin,
    /// A join type other than inner or left (right, full, semi, anti).
    JoinTypeNotAllowed,
    /// A join condition that is not a conjunction of equalities between plain columns.
    JoinConditionNotAllowed,
    /// A join not anchored on the privacy unit or a declared join key, or on a column whose role
    /// cannot be joined (a measure, a masked column).
    JoinKeyNotAllowed,
    /// A join key used outside an equi-join condition (output, grouped, compared, aggregated).
    JoinKeyOutsideJoin,
    /// A masked token (partial mask or pseudonym) compared to a value or used in an expression.
    MaskedValueInExpression,
    /// A range filter on a measure that the grant does not list in `filter_measures`.
    MeasureFilterNotGranted,
    /// In an exact answer to ad-hoc SQL, an aggregate other than a count of a measure that a range filter
    /// of the same query compares (the filter fixes the values it keeps).
    FilteredMeasureAggregated,
    /// In an exact answer, an aggregate of a value from the null-extended side of a left join.
    NullExtendedAggregated,
    /// An aggregate over aggregated rows in a shape the guard cannot prove safe (a limit inside
    /// the derived table, an aggregate below a join or inside an expression).
    NestedAggregateNotSupported,
    /// More than one filter over aggregated rows (`HAVING`) in a query.
    HavingNotSupported,
    /// The privacy unit would appear in the output.
    IdentifierOutput,
    /// The privacy unit in `GROUP BY`.
    IdentifierGrouped,
    /// The privacy unit compared to a value or used in an expression.
    IdentifierInExpression,
    /// A measure outside an aggregate function (output, grouping, filter).
    MeasureOutsideAggregate,
    /// An aggregate over something other than a plain column.
    AggregateArgumentNotPlain,
    /// An aggregate function the grant does not allow.
    FunctionNotAllowed,
    /// `DISTINCT` inside an aggregate on something other than the privacy unit or a dimension.
    DistinctNotAllowed,
    /// `FILTER (WHERE ...)` or `ORDER BY` inside an aggregate.
    AggregateModifierNotAllowed,
    /// An expression kind the guard does not allow (`CASE`, placeholders, ...).
    ExpressionNotAllowed,
    /// A scalar function outside the allow-list.
    ScalarFunctionNotAllowed,
    /// A subquery in an expression.
    SubqueryNotAllowed,
    /// A column whose level does not allow this use.
    LevelCap,
    /// An output named like the sandbox's hidden columns.
    ReservedName,
    /// `LIMIT`/`OFFSET` must be constants.
    LimitNotConstant,
    /// The privacy unit is not available where the guard must count it.
    PrivacyUnitUnavailable,
    /// Row mode (a code job's input): a column the module's approval does not list.
    ColumnNotApproved,
    /// Differential privacy is asked for or needed, but a dataset's grant does not offer it.
    DpNotGranted,
    /// A query shape or function differential privacy does not cover here (`MIN`/`MAX`,
    /// `HAVING`, ordering by a noisy value, nested aggregates, joins through a join key).
    DpNotSupported,
    /// `SUM` or `AVG` under differential privacy of a measure without declared bounds.
    DpBoundsMissing,
    /// An exact answer would aggregate values of rows a join copies (the other side is not
    /// unique on the join columns), or count joined rows where every side is copied: one
    /// source row would count several times, within a group or across groups.
    JoinCopiesRows,
    /// An exact answer needs every dataset's declared row key at the aggregate (the
    /// differencing defense tells input rows apart by it), and the dataset to declare one.
    RowKeyUnavailable,
    /// An expression that could raise an error on some values (integer division by -1, a
    /// literal argument out of range, decimal arithmetic): whether the query fails would depend
    /// on rows the caller never sees.
    ExpressionMayFail,
}

impl Rule {
    pub fn code(self) -> &'static str {
        match self {
            Rule::StatementNotQuery => "statement-not-query",
            Rule::QueryTooLong => "query-too-long",
            Rule::QueryTooComplex => "query-too-complex",
            Rule::CastMayFail => "cast-may-fail",
            Rule::DatasetNotGranted => "dataset-not-granted",
            Rule::ModeNotGranted => "mode-not-granted",
            Rule::AggregateRequired => "aggregate-required",
            Rule::PlanNodeNotAllowed => "plan-node-not-allowed",
            Rule::CrossJoin => "cross-join",
            Rule::JoinTypeNotAllowed => "join-type-not-allowed",
            Rule::JoinConditionNotAllowed => "join-condition-not-allowed",
            Rule::JoinKeyNotAllowed => "join-key-not-allowed",
            Rule::JoinKeyOutsideJoin => "join-key-outside-join",
            Rule::MaskedValueInExpression => "masked-value-in-expression",
            Rule::MeasureFilterNotGranted => "measure-filter-not-granted",
            Rule::FilteredMeasureAggregated => "filtered-measure-aggregated",
            Rule::NullExtendedAggregated => "null-extended-aggregated",
            Rule::NestedAggregateNotSupported => "nested-aggregate-not-supported",
            Rule::HavingNotSupported => "having-not-supported",
            Rule::IdentifierOutput => "identifier-output",
            Rule::IdentifierGrouped => "identifier-grouped",
            Rule::IdentifierInExpression => "identifier-in-expression",
            Rule::MeasureOutsideAggregate => "measure-outside-aggregate",
            Rule::AggregateArgumentNotPlain => "aggregate-argument-not-plain",
            Rule::FunctionNotAllowed => "function-not-allowed",
            Rule::DistinctNotAllowed => "distinct-not-allowed",
            Rule::AggregateModifierNotAllowed => "aggregate-modifier-not-allowed",
            Rule::ExpressionNotAllowed => "expression-not-allowed",
            Rule::ScalarFunctionNotAllowed => "scalar-function-not-allowed",
            Rule::SubqueryNotAllowed => "subquery-not-allowed",
            Rule::LevelCap => "level-cap",
            Rule::ReservedName => "reserved-name",
            Rule::LimitNotConstant => "limit-not-constant",
            Rule::PrivacyUnitUnavailable => "privacy-unit-unavailable",
            Rule::ColumnNotApproved => "column-not-approved",
            Rule::DpNotGranted => "dp-not-granted",
            Rule::DpNotSupported => "dp-not-supported",
            Rule::DpBoundsMissing => "dp-bounds-missing",
            Rule::JoinCopiesRows => "join-copies-rows",
            Rule::RowKeyUnavailable => "row-key-unavailable",
            Rule::ExpressionMayFail => "expression-may-fail",
        }
    }

    /// Every rule, for documentation and for tests that check the suite covers them.
    pub const ALL: [Rule; 41] = [
        Rule::StatementNotQuery,
        Rule::QueryTooLong,
        Rule::QueryTooComplex,
        Rule::CastMayFail,
        Rule::DatasetNotGranted,
        Rule::ModeNotGranted,
        Rule::AggregateRequired,
        Rule::PlanNodeNotAllowed,
        Rule::CrossJoin,
        Rule::JoinTypeNotAllowed,
        Rule::JoinConditionNotAllowed,
        Rule::JoinKeyNotAllowed,
        Rule::JoinKeyOutsideJoin,
        Rule::MaskedValueInExpression,
        Rule::MeasureFilterNotGranted,
        Rule::FilteredMeasureAggregated,
        Rule::NullExtendedAggregated,
        Rule::NestedAggregateNotSupported,
        Rule::HavingNotSupported,
        Rule::IdentifierOutput,
        Rule::IdentifierGrouped,
        Rule::IdentifierInExpression,
        Rule::MeasureOutsideAggregate,
        Rule::AggregateArgumentNotPlain,
        Rule::FunctionNotAllowed,
        Rule::DistinctNotAllowed,
        Rule::AggregateModifierNotAllowed,
        Rule::ExpressionNotAllowed,
        Rule::ScalarFunctionNotAllowed,
        Rule::SubqueryNotAllowed,
        Rule::LevelCap,
        Rule::ReservedName,
        Rule::LimitNotConstant,
        Rule::PrivacyUnitUnavailable,
        Rule::ColumnNotApproved,
        Rule::DpNotGranted,
        Rule::DpNotSupported,
        Rule::DpBoundsMissing,
        Rule::JoinCopiesRows,
        Rule::RowKeyUnavailable,
        Rule::ExpressionMayFail,
    ];
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A policy denial: the rule and a message that names query elements, never data values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: Rule,
    pub message: String,
}

impl Denial {
    pub fn new(rule: Rule, message: impl Into<String>) -> Self {
        Denial {
            rule,
            message: message.into(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The rule travels separately (status metadata, journal field); the text is the reason.
        f.write_str(&self.message)
    }
}

/// Errors of the SQL path.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("{0}")]
    Denied(Denial),
    /// The SQL does not parse. The message quotes only the query itself (see [`syntax_error`]).
    #[error("{0}")]
    Syntax(String),
    /// The query does not plan (unknown column, type mismatch). Planning reads no data.
    #[error("cannot plan query: {0}")]
    Plan(String),
    /// Running the query failed. The cause may contain data values, so it is logged, not shown.
    #[error("query execution failed")]
    Execution(String),
    #[error("query exceeded its memory or row limit")]
    ResourcesExhausted(String),
    #[error("query exceeded its time limit of {0} ms")]
    TimeLimit(u64),
    #[error("query was cancelled")]
    Cancelled,
    /// A dataset could not be set up at start; names the policy location.
    #[error("dataset `{dataset}` ({location}): {message}")]
    Dataset {
        dataset: String,
        location: String,
        message: String,
    },
}

impl SqlError {
    /// Stable code of the error.
    pub fn code(&self) -> &'static str {
        match self {
            SqlError::Denied(d) => d.rule.code(),
            SqlError::Syntax(_) => "sql-syntax",
            SqlError::Plan(_) => "sql-plan",
            SqlError::Execution(_) => "execution-failed",
            SqlError::ResourcesExhausted(_) => "resources-exhausted",
            SqlError::TimeLimit(_) => "time-limit",
            SqlError::Cancelled => "cancelled",
            SqlError::Dataset { .. } => "dataset-setup",
        }
    }
}

impl From<Denial> for SqlError {
    fn from(d: Denial) -> Self {
        SqlError::Denied(d)
    }
}

pub type Result<T, E = SqlError> = std::result::Result<T, E>;

/// The text of a parse error as a person reads it: `syntax error: Expected: ..., found: ... at
/// Line: 1, Column: 8`. DataFusion prints the parser's error through `Debug` (`SQL error:
/// ParserError("...")`); `None` when the error is not the parser's.
pub fn syntax_error(error: &DataFusionError) -> Option<String> {
    let DataFusionError::SQL(parser, _) = error.find_root() else {
        return None;
    };
    Some(match parser.as_ref() {
        ParserError::TokenizerError(message) | ParserError::ParserError(message) => {
            format!("syntax error: {message}")
        }
        ParserError::RecursionLimitExceeded => {
            "syntax error: the query nests deeper than the parser follows".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    use super::*;

    /// Parse errors read as text, without the `Debug` form DataFusion gives them; other errors
    /// are not taken for parse errors. (query, its message)
    #[test]
    fn parse_errors_read_as_syntax_errors() {
        let cases = [
            (
                "SELECT a FROM t WHERE )",
                Some("syntax error: Expected: an expression, found: ) at Line: 1, Column: 23"),
            ),
            (
                "SELEC x",
                Some(
                    "syntax error: Expected: an SQL statement, found: SELEC at Line: 1, Column: 1",
                ),
            ),
            ("SELECT 'open", None),
        ];
        for (sql, expected) in cases {
            let error = Parser::parse_sql(&GenericDialect {}, sql).expect_err(sql);
            let wrapped = DataFusionError::SQL(Box::new(error), None);
            let message = syntax_error(&wrapped).expect("a parse error");
            assert!(!message.contains("ParserError"), "{message}");
            if let Some(expected) = expected {
                assert_eq!(message, expected, "{sql}");
            }
        }
        let other = DataFusionError::Plan("no such column".into());
        assert_eq!(syntax_error(&other), None);
    }
}
