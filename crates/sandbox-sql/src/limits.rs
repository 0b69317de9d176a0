//! Resource limits of one query: its own memory pool inside the shared one, and the size of its
//! plan, checked before the guard and the optimizer walk it.

use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion, TreeNodeVisitor};
use datafusion::error::Result as DfResult;
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Denial, Result, Rule};
use crate::session::SqlLimits;

/// A query's memory pool: every reservation counts against the query's own limit and against
/// the pool all queries share. Operators that can spill (sorts, aggregates, joins) spill when
/// either says no; the others fail the query with `resources-exhausted`.
#[derive(Debug)]
pub(crate) struct JobMemoryPool {
    /// Fair among the query's own spilling operators, up to the per-query limit.
    job: FairSpillPool,
    limit: usize,
    shared: Arc<dyn MemoryPool>,
}

impl JobMemoryPool {
    pub(crate) fn new(limit: usize, shared: Arc<dyn MemoryPool>) -> Self {
        JobMemoryPool {
            job: FairSpillPool::new(limit),
            limit,
            shared,
        }
    }
}

impl fmt::Display for JobMemoryPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query pool of {} bytes ({} reserved) within {}",
            self.limit,
            self.job.reserved(),
            self.shared
        )
    }
}

impl MemoryPool for JobMemoryPool {
    fn name(&self) -> &str {
        "sandbox-job"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.job.register(consumer);
        self.shared.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.job.unregister(consumer);
        self.shared.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.job.grow(reservation, additional);
        self.shared.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.job.shrink(reservation, shrink);
        self.shared.shrink(reservation, shrink);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> DfResult<()> {
        self.job.try_grow(reservation, additional)?;
        if let Err(error) = self.shared.try_grow(reservation, additional) {
            self.job.shrink(reservation, additional);
            return Err(error);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.job.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// Refuses query text whose expressions would nest deeper than the limits, before it is parsed:
/// the parser builds `a + b + c ...` iteratively, but everything after it (planning, naming
/// columns, comparing and dropping expressions) recurses once per operator, so a long chain
/// would overflow the stack. Counts, per parenthesis level, the operators since the last comma,
/// parenthesis or clause keyword (an upper bound of how deep they nest), and all tokens.
pub(crate) fn check_tokens(sql: &str, limits: &SqlLimits) -> Result<()> {
    let dialect = GenericDialect {};
    // Text the tokenizer rejects is reported by the parser, with its position.
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize() else {
        return Ok(());
    };
    let significant = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if significant > limits.max_plan_nodes {
        return Err(Denial::new(
            Rule::QueryTooComplex,
            format!(
                "the query has {significant} tokens; the limit is {}",
                limits.max_plan_nodes
            ),
        )
        .into());
    }
    // Operators since the last separator, per open parenthesis.
    let mut runs: Vec<usize> = vec![0];
    for token in &tokens {
        match token {
            Token::LParen => runs.push(0),
            // An unbalanced `)` is the parser's to report.
            Token::RParen if runs.len() > 1 => {
                runs.pop();
            }
            Token::Comma | Token::SemiColon => *runs.last_mut().expect("never empty") = 0,
            Token::Word(word) if is_clause(word.keyword) => {
                *runs.last_mut().expect("never empty") = 0
            }
            token if is_operator(token) => {
                let run = runs.last_mut().expect("never empty");
                *run += 1;
                if *run > limits.max_expr_depth {
                    return Err(Denial::new(
                        Rule::QueryTooComplex,
                        format!(
                            "an expression of the query chains more than {} operators",
                            limits.max_expr_depth
                        ),
                    )
                    .into());
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_operator(token: &Token) -> bool {
    match token {
        Token::Plus
        | Token::Minus
        | Token::Mul
        | Token::Div
        | Token::Mod
        | Token::StringConcat
        | Token::Eq
        | Token::DoubleEq
        | Token::Neq
        | Token::Lt
        | Token::Gt
        | Token::LtEq
        | Token::GtEq
        | Token::Ampersand
        | Token::Pipe
        | Token::Caret
        | Token::DoubleColon => true,
        Token::Word(word) => matches!(
            word.keyword,
            Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::IS
        ),
        _ => false,
    }
}

/// Keywords that start a new clause or a new branch, after which expressions start afresh.
fn is_clause(keyword: Keyword) -> bool {
    matches!(
        keyword,
        Keyword::SELECT
            | Keyword::FROM
            | Keyword::WHERE
            | Keyword::GROUP
            | Keyword::HAVING
            | Keyword::ORDER
            | Keyword::LIMIT
            | Keyword::OFFSET
            | Keyword::ON
            | Keyword::JOIN
            | Keyword::UNION
            | Keyword::WHEN
            | Keyword::THEN
            | Keyword::ELSE
            | Keyword::END
            | Keyword::AS
            | Keyword::WITH
    )
}

/// Refuses a plan with more nodes or deeper expressions than the limits allow (`query-too-complex`),
/// before anything else walks it: the guard, the optimizer and the physical planner all recurse
/// over it, and their cost grows with its size.
pub(crate) fn check_plan_size(plan: &LogicalPlan, limits: &SqlLimits) -> Result<()> {
    let mut size = PlanSize {
        max_nodes: limits.max_plan_nodes,
        max_depth: limits.max_expr_depth,
        ..PlanSize::default()
    };
    plan.apply_with_subqueries(|node| {
        size.nodes += 1;
        node.apply_expressions(|expr| {
            size.depth = 0;
            expr.visit(&mut size)?;
            Ok(size.recursion())
        })?;
        Ok(size.recursion())
    })
    .map_err(|e| crate::error::SqlError::Plan(e.to_string()))?;
    if size.nodes > size.max_nodes {
        return Err(Denial::new(
            Rule::QueryTooComplex,
            format!(
                "the query's plan has more than {} nodes (plan nodes and expression terms)",
                size.max_nodes
            ),
        )
        .into());
    }
    if size.deepest > size.max_depth {
        return Err(Denial::new(
            Rule::QueryTooComplex,
            format!(
                "an expression of the query nests more than {} levels deep",
                size.max_depth
            ),
        )
        .into());
    }
    Ok(())
}

/// Counts nodes and the deepest expression, stopping as soon as a limit is passed.
#[derive(Debug, Default)]
struct PlanSize {
    nodes: usize,
    depth: usize,
    deepest: usize,
    max_nodes: usize,
    max_depth: usize,
}

impl PlanSize {
    fn recursion(&self) -> TreeNodeRecursion {
        if self.nodes > self.max_nodes || self.deepest > self.max_depth {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        }
    }
}

impl<'n> TreeNodeVisitor<'n> for PlanSize {
    type Node = Expr;

    fn f_down(&mut self, _node: &'n Expr) -> DfResult<TreeNodeRecursion> {
        self.nodes += 1;
        self.depth += 1;
        self.deepest = self.deepest.max(self.depth);
        Ok(self.recursion())
    }

    fn f_up(&mut self, _node: &'n Expr) -> DfResult<TreeNodeRecursion> {
        self.depth -= 1;
        Ok(TreeNodeRecursion::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::GreedyMemoryPool;

    #[test]
    fn job_pool_counts_against_both_limits() {
        let shared: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(1000));
        let a: Arc<dyn MemoryPool> = Arc::new(JobMemoryPool::new(600, shared.clone()));
        let b: Arc<dyn MemoryPool> = Arc::new(JobMemoryPool::new(600, shared.clone()));
        let ra = MemoryConsumer::new("a").register(&a);
        let rb = MemoryConsumer::new("b").register(&b);
        ra.try_grow(500).unwrap();
        // Over the query's own limit.
        assert!(ra.try_grow(200).is_err());
        assert_eq!(a.reserved(), 500);
        // Within its own limit but over what the shared pool has left: refused, and nothing
        // stays reserved in the query's pool.
        assert!(rb.try_grow(600).is_err());
        assert_eq!(b.reserved(), 0);
        rb.try_grow(500).unwrap();
        assert_eq!(shared.reserved(), 1000);
        drop(ra);
        assert_eq!(shared.reserved(), 500);
    }
}
