//! Consent at the scan: a code job's (or a scoring template's) input reads a dataset through a
//! [`ConsentedTable`], whose scan keeps only the rows of entities that consented, right above the
//! Parquet reader. No expression of the input query, filter or projection, ever evaluates on a
//! row of an entity that did not consent: an error that fires on such a row (THREATS class 26)
//! cannot happen, because the row is not there.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, DFSchema, Result, exec_err};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExecBuilder;

/// The entities (privacy unit values) that consented to one consumer for one purpose.
pub type ConsentSet = Arc<HashSet<String>>;

/// `sandbox_consented(unit)`: whether the unit is in the set. Never registered in a session, so
/// a query cannot name it.
#[derive(Debug)]
struct ConsentedFunction {
    consented: ConsentSet,
    signature: Signature,
}

impl PartialEq for ConsentedFunction {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.consented, &other.consented)
    }
}

impl Eq for ConsentedFunction {}

impl Hash for ConsentedFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.consented).hash(state);
    }
}

impl ScalarUDFImpl for ConsentedFunction {
    fn name(&self) -> &str {
        "sandbox_consented"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [input] = args.args.as_slice() else {
            return exec_err!("sandbox_consented takes one argument");
        };
        let units = cast(&input.to_array(args.number_rows)?, &DataType::Utf8)?;
        let units = units.as_string::<i32>();
        let kept: BooleanArray = (0..units.len())
            .map(|row| Some(units.is_valid(row) && self.consented.contains(units.value(row))))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(kept)))
    }
}

/// A dataset seen by a code job's input: only the rows whose privacy unit consented.
#[derive(Debug)]
pub struct ConsentedTable {
    inner: Arc<dyn TableProvider>,
    unit: String,
    consented: ConsentSet,
}

impl ConsentedTable {
    pub fn new(inner: Arc<dyn TableProvider>, unit: &str, consented: ConsentSet) -> Self {
        ConsentedTable {
            inner,
            unit: unit.to_string(),
            consented,
        }
    }
}

#[async_trait]
impl TableProvider for ConsentedTable {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// The inner scan with the unit column added if the projection lacks it, then a filter on
    /// consent, then the projection asked for. Nothing is pushed into the inner scan: every
    /// filter of the query stays above the consent filter.
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = self.inner.schema();
        let unit_index = schema.index_of(&self.unit)?;
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..schema.fields().len()).collect(),
        };
        let mut read = wanted.clone();
        if !read.contains(&unit_index) {
            read.push(unit_index);
        }
        let inner = self.inner.scan(state, Some(&read), &[], None).await?;
        let inner_schema = inner.schema();
        let df_schema = DFSchema::try_from(inner_schema.as_ref().clone())?;
        let function = ScalarUDF::new_from_impl(ConsentedFunction {
            consented: self.consented.clone(),
            signature: Signature::any(1, Volatility::Immutable),
        });
        let predicate = state.create_physical_expr(
            function.call(vec![Expr::Column(Column::new_unqualified(&self.unit))]),
            &df_schema,
        )?;
        // Back to the columns asked for, in their order (positions within what was read), when
        // the unit was read for the filter alone.
        let keep = (read.len() != wanted.len()).then(|| (0..wanted.len()).collect());
        Ok(Arc::new(
            FilterExecBuilder::new(predicate, inner)
                // Plan as if every row stayed: what the filter keeps is no business of the
                // planner's estimates, and a smaller estimate sizes sorts too small.
                .with_default_selectivity(100)
                .apply_projection(keep)?
                .build()?,
        ))
    }
}
