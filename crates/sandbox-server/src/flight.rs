//! Arrow Flight SQL over the same engine calls as the native service, so that ADBC, JDBC and BI
//! tools connect without a client of ours. Each Flight call is admitted by the same
//! [`Gatekeeper`] (credentials, rate limit, roles) and ends in the same engine call, journaled the
//! same way; there is no second policy path:
//!
//! | Flight SQL                                  | engine call (journal action)            |
//! |---------------------------------------------|-----------------------------------------|
//! | `Handshake` (basic or bearer)               | `record_call` (`FlightSql.Handshake`)   |
//! | `CreatePreparedStatement`                   | `explain` (`ExplainJob`)                |
//! | `GetFlightInfo` statement / prepared        | `submit_deferred` (`AdmitJob`, `SubmitJob`) |
//! | `DoGet` of a statement ticket               | `wait_result` (`FetchResult`)           |
//! | `GetCatalogs`, `GetDbSchemas`, `GetTables`, `GetTableTypes` | `sql_catalog` (`ListDatasets`) |
//! | `GetSqlInfo`, `ClosePreparedStatement`, the `GetFlightInfo` of a listing | `record_call` |
//! | the `CloseSession` action (ADBC sends it when a connection closes) | `record_call` |
//!
//! Any other action is refused `INVALID_ARGUMENT` (`unknown-action`) once the caller is admitted,
//! and journaled under the caller like every call.
//!
//! `GetFlightInfo` for a query runs the guard and planning (a denial is answered there, naming
//! its rule) and admits the job (a privacy budget is debited here, as at any admission), and
//! answers with the schema its release will have and an opaque ticket (the job's id, usable only
//! by its owner). `DoGet` starts the job, waits for its release and streams exactly the rows the
//! release gate let through; the release summary (rows suppressed, noise) travels as JSON in the
//! first message's `app_metadata`. A ticket not fetched within the query time limit ends its job
//! unrun (`not-fetched`), freeing its admission slot.

use std::pin::Pin;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    SqlSupportedTransaction, TicketStatementQuery,
};
use arrow_flight::{
    ActionType, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use sandbox_engine::{JobSpec, ReleaseOutcome, RequestContext};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Credentials, Rpc};
use crate::detach::ClientGone;
use crate::gatekeeper::{Call, CallError, Gatekeeper};
use crate::status;

/// The catalog and schema every granted dataset is in: the names the guard accepts as
/// qualifiers (`datafusion.public.tax` and `tax` are the same table).
pub const CATALOG: &str = "datafusion";
pub const SCHEMA: &str = "public";
const TABLE_TYPE: &str = "TABLE";
/// The most messages a parameter binding may send (a schema and an empty batch are what drivers
/// send for a statement without parameters).
const MAX_PARAMETER_MESSAGES: usize = 16;

type FlightStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
type DoGetStream = <FlightSql as FlightService>::DoGetStream;
type DoActionStream = <FlightSql as FlightService>::DoActionStream;

/// The action type of Flight's `CloseSession` (`Flight.proto`'s session actions, which
/// `arrow-flight` 59 does not define). Its request and result are plain protobuf messages, not
/// wrapped in `Any` as Flight SQL's actions are.
pub const CLOSE_SESSION: &str = "CloseSession";

/// `CloseSessionRequest`: empty (the session is whatever the connection carries).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseSessionRequest {}

/// `CloseSessionResult`: `status` is the `CloseSessionResult.Status` enum.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseSessionResult {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `CloseSessionResult.Status.CLOSED`: the close is complete.
pub const CLOSE_SESSION_CLOSED: i32 = 1;

/// `arrow.flight.protocol.FlightService`, speaking Flight SQL.
pub struct FlightSql {
    gate: Gatekeeper,
    info: SqlInfoData,
}

impl std::fmt::Debug for FlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSql").finish_non_exhaustive()
    }
}

impl FlightSql {
    pub fn new(gate: Gatekeeper) -> anyhow::Result<Self> {
        Ok(FlightSql {
            gate,
            info: server_info()?,
        })
    }

    /// A listing's flight info: one ticket, the command itself, answered by `DoGet`.
    async fn listing_info(
        &self,
        request: Request<FlightDescriptor>,
        rpc: Rpc,
        command: impl ProstMessageExt,
        schema: &Schema,
    ) -> Result<Response<FlightInfo>, Status> {
        self.gate
            .serve(request, rpc, |call| async move {
                call.engine.record_call(&call.ctx, rpc.name()).await?;
                let info = FlightInfo::new()
                    .try_with_schema(schema)
                    .map_err(|e| internal(e, &call.ctx))?
                    .with_endpoint(
                        FlightEndpoint::new()
                            .with_ticket(Ticket::new(command.as_any().encode_to_vec())),
                    )
                    .with_descriptor(call.message);
                Ok(Response::new(info))
            })
            .await
    }
}

/// The job for a query: guard, planning and admission; the ticket is the job.
async fn execute(
    call: Call<'_, FlightDescriptor>,
    query: String,
) -> Result<Response<FlightInfo>, CallError> {
    let snapshot = call
        .engine
        .submit_deferred(&call.ctx, JobSpec::Sql { query, dp: None })
        .await?;
    let schema = snapshot
        .released_schema
        .ok_or_else(|| internal("a submitted query has no released schema", &call.ctx))?;
    let ticket = TicketStatementQuery {
        statement_handle: snapshot.job_id.into(),
    };
    let info = FlightInfo::new()
        .try_with_schema(&schema)
        .map_err(|e| internal(e, &call.ctx))?
        .with_endpoint(
            FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec())),
        )
        .with_descriptor(call.message)
        // Known only once the gate has decided.
        .with_total_records(-1)
        .with_ordered(true);
    Ok(Response::new(info))
}

fn internal(error: impl std::fmt::Display, ctx: &RequestContext) -> Status {
    tracing::error!(request_id = %ctx.request_id, %error, "flight sql: internal error");
    Status::internal(format!("internal error (request {})", ctx.request_id))
}

/// One batch (a listing) as a Flight stream.
fn batch_stream(batch: RecordBatch) -> Response<DoGetStream> {
    let schema = batch.schema();
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(flight_status);
    Response::new(Box::pin(stream))
}

fn flight_status(error: FlightError) -> Status {
    match error {
        FlightError::Tonic(status) => *status,
        other => {
            tracing::error!(error = %other, "flight sql: cannot encode a stream");
            Status::internal("cannot encode the result")
        }
    }
}

fn listing_error(error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "flight sql: cannot build a listing");
    Status::internal("cannot build the listing")
}

/// What a client learns about a release besides its rows: the same figures as the native
/// `ReleaseSummary`.
fn summary_json(outcome: &ReleaseOutcome) -> Bytes {
    let dp = outcome.dp.as_ref().map(|dp| {
        serde_json::json!({
            "epsilon_spent": dp.epsilon_spent,
            "delta_spent": dp.delta_spent,
            "epsilon_remaining": dp.epsilon_remaining,
            "delta_remaining": dp.delta_remaining,
            "cached": dp.cached,
            "columns": dp.columns.iter().map(|c| serde_json::json!({
                "column": c.column,
                "scale": c.scale,
                "accuracy_95": c.accuracy_95,
                "rows_95": c.rows,
            })).collect::<Vec<_>>(),
        })
    });
    let value = serde_json::json!({
        "rows_released": outcome.rows_released,
        "min_units": outcome.min_units,
        "stored": outcome.stored,
        "result_sha256": outcome.result_sha256,
        "audit_seq": outcome.audit_seq,
        "dp": dp,
    });
    Bytes::from(value.to_string())
}

/// What the server tells clients about itself (`GetSqlInfo`). JDBC tools read the keyword and
/// function lists and fail without them.
fn server_info() -> anyhow::Result<SqlInfoData> {
    let mut info = SqlInfoDataBuilder::new();
    info.append(SqlInfo::FlightSqlServerName, "sandboxd");
    info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    info.append(SqlInfo::FlightSqlServerReadOnly, true);
    info.append(SqlInfo::FlightSqlServerSql, true);
    info.append(SqlInfo::FlightSqlServerSubstrait, false);
    info.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    info.append(SqlInfo::FlightSqlServerCancel, false);
    info.append(SqlInfo::SqlDdlCatalog, false);
    info.append(SqlInfo::SqlDdlSchema, false);
    info.append(SqlInfo::SqlDdlTable, false);
    info.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    info.append(SqlInfo::SqlQuotedIdentifierCase, 3_i32); // case sensitive
    info.append(SqlInfo::SqlIdentifierCase, 2_i32); // lowercase
    info.append(SqlInfo::SqlSupportsColumnAliasing, true);
    info.append(SqlInfo::SqlNullPlusNullIsNull, true);
    info.append(SqlInfo::SqlTransactionsSupported, false);
    info.append(SqlInfo::SqlCatalogTerm, "catalog");
    info.append(SqlInfo::SqlSchemaTerm, "schema");
    info.append(
        SqlInfo::SqlKeywords,
        &[
            "SELECT", "FROM", "WHERE", "GROUP", "BY", "HAVING", "ORDER", "LIMIT", "OFFSET", "JOIN",
            "ON", "WITH", "AS", "CASE", "WHEN", "THEN", "ELSE", "END", "DISTINCT",
        ][..],
    );
    info.append(
        SqlInfo::SqlNumericFunctions,
        &[
            "abs", "ceil", "floor", "round", "ln", "log10", "power", "sqrt",
        ][..],
    );
    info.append(
        SqlInfo::SqlStringFunctions,
        &["lower", "upper", "substr", "length", "trim", "concat"][..],
    );
    info.append(SqlInfo::SqlSystemFunctions, &[][..] as &[&str]);
    info.append(
        SqlInfo::SqlDatetimeFunctions,
        &["date_trunc", "date_part", "extract", "now"][..],
    );
    Ok(info.build()?)
}

/// The schema of a listing command's answer, as bytes for a prepared statement.
fn schema_bytes(schema: &Schema) -> Result<Bytes, arrow::error::ArrowError> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default()).try_into()?;
    Ok(bytes)
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = FlightSql;

    /// Basic credentials (user = principal, password = its token) or a bearer token, answered
    /// with the bearer token to send on every further call.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<FlightStream<HandshakeResponse>>, Status> {
        // Admission parses the same header (and refuses the call if it is not valid); a client
        // certificate alone carries no token.
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Credentials::parse(v).ok())
            .map(|c| c.token().to_string())
            .unwrap_or_default();
        self.gate
            .serve(request, Rpc::FlightHandshake, |call| async move {
                call.engine
                    .record_call(&call.ctx, Rpc::FlightHandshake.name())
                    .await?;
                let answer = HandshakeResponse {
                    protocol_version: 0,
                    payload: Bytes::from(token.clone()),
                };
                let mut response: Response<FlightStream<HandshakeResponse>> =
                    Response::new(Box::pin(futures::stream::iter([Ok(answer)])));
                if !token.is_empty() {
                    let value = MetadataValue::try_from(format!("Bearer {token}"))
                        .map_err(|e| internal(e, &call.ctx))?;
                    response.metadata_mut().insert("authorization", value);
                }
                Ok(response)
            })
            .await
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.gate
            .serve(request, Rpc::FlightExecute, |call| {
                execute(call, query.query)
            })
            .await
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.gate
            .serve(request, Rpc::FlightExecute, |call| async move {
                // A prepared statement's handle is its query text: nothing is held on the server
                // between calls, and the query is checked again (guard and all) when it runs.
                let Ok(sql) = String::from_utf8(query.prepared_statement_handle.to_vec()) else {
                    return Err(CallError::Invalid {
                        code: "invalid-handle",
                        message: "the prepared statement handle is not one this server issued",
                    });
                };
                execute(call, sql).await
            })
            .await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let gone = ClientGone::of(&request);
        self.gate
            .serve(request, Rpc::FlightFetch, |call| async move {
                let Ok(job_id) = String::from_utf8(ticket.statement_handle.to_vec()) else {
                    return Err(CallError::Invalid {
                        code: "invalid-ticket",
                        message: "the ticket is not one this server issued",
                    });
                };
                let result = call
                    .engine
                    .wait_result_watched(&call.ctx, &job_id, &gone)
                    .await?;
                // The released rows, exactly as the gate produced them (the journal hashed their
                // IPC encoding): sent as the batches they are, not decoded again from that
                // encoding. Cloning a batch shares its buffers.
                let batches = result.batches().to_vec();
                let stream: DoGetStream = Box::pin(
                    FlightDataEncoderBuilder::new()
                        .with_schema(result.schema().clone())
                        .with_metadata(summary_json(result.outcome()))
                        .build(futures::stream::iter(batches.into_iter().map(Ok)))
                        .map_err(flight_status),
                );
                Ok(Response::new(stream))
            })
            .await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.gate
            .serve(request, Rpc::FlightPrepare, |call| async move {
                let explanation = call
                    .engine
                    .explain(
                        &call.ctx,
                        JobSpec::Sql {
                            query: query.query.clone(),
                            dp: None,
                        },
                    )
                    .await?;
                if !explanation.allowed {
                    return Err(CallError::Answered(status::denied(
                        explanation.rule,
                        &explanation.message,
                        &call.ctx.request_id,
                    )));
                }
                let schema = explanation.released_schema.ok_or_else(|| {
                    internal("an allowed query has no released schema", &call.ctx)
                })?;
                Ok(ActionCreatePreparedStatementResult {
                    prepared_statement_handle: Bytes::from(query.query),
                    dataset_schema: schema_bytes(&schema).map_err(|e| internal(e, &call.ctx))?,
                    parameter_schema: Bytes::new(),
                })
            })
            .await
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        self.gate
            .serve(request, Rpc::FlightClosePrepared, |call| async move {
                call.engine
                    .record_call(&call.ctx, Rpc::FlightClosePrepared.name())
                    .await?;
                Ok(())
            })
            .await
    }

    /// Binding parameters: an empty binding (what drivers send for a statement without `?`) is
    /// accepted; values are refused, since the guard checks a query as written.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.gate
            .serve(request, Rpc::FlightPrepare, |call| async move {
                if binds_values(call.message).await? {
                    return Err(CallError::Invalid {
                        code: "parameters-not-supported",
                        message: "query parameters are not supported: write the values into the \
                                  query (it is checked as written)",
                    });
                }
                call.engine
                    .record_call(&call.ctx, Rpc::FlightPrepare.name())
                    .await?;
                Ok(DoPutPreparedStatementResult {
                    prepared_statement_handle: Some(query.prepared_statement_handle),
                })
            })
            .await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.listing_info(request, Rpc::FlightGetCatalog, query, &schema)
            .await
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.listing_info(request, Rpc::FlightGetCatalog, query, &schema)
            .await
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.listing_info(request, Rpc::FlightGetCatalog, query, &schema)
            .await
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.listing_info(request, Rpc::FlightGetCatalog, query, &schema)
            .await
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        self.listing_info(request, Rpc::FlightGetSqlInfo, query, &schema)
            .await
    }

    // The catalog listings are each recorded as a `ListDatasets` naming the tables the caller
    // can query (`sql_catalog`), whatever part of the catalog they show.

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.gate
            .serve(request, Rpc::FlightGetCatalog, |call| async move {
                call.engine.sql_catalog(&call.ctx).await?;
                let mut builder = query.into_builder();
                builder.append(CATALOG);
                Ok(batch_stream(builder.build().map_err(listing_error)?))
            })
            .await
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.gate
            .serve(request, Rpc::FlightGetCatalog, |call| async move {
                call.engine.sql_catalog(&call.ctx).await?;
                let mut builder = query.into_builder();
                builder.append(CATALOG, SCHEMA);
                Ok(batch_stream(builder.build().map_err(listing_error)?))
            })
            .await
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.gate
            .serve(request, Rpc::FlightGetCatalog, |call| async move {
                let tables = call.engine.sql_catalog(&call.ctx).await?;
                let mut builder = query.into_builder();
                for (name, schema) in &tables {
                    builder
                        .append(CATALOG, SCHEMA, name, TABLE_TYPE, schema)
                        .map_err(listing_error)?;
                }
                Ok(batch_stream(builder.build().map_err(listing_error)?))
            })
            .await
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.gate
            .serve(request, Rpc::FlightGetCatalog, |call| async move {
                call.engine.sql_catalog(&call.ctx).await?;
                let mut builder = query.into_builder();
                builder.append(TABLE_TYPE);
                Ok(batch_stream(builder.build().map_err(listing_error)?))
            })
            .await
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.gate
            .serve(request, Rpc::FlightGetSqlInfo, |call| async move {
                call.engine
                    .record_call(&call.ctx, Rpc::FlightGetSqlInfo.name())
                    .await?;
                let batch = query
                    .into_builder(&self.info)
                    .build()
                    .map_err(listing_error)?;
                Ok(batch_stream(batch))
            })
            .await
    }

    /// `CloseSession`, and every action neither Flight SQL nor this server defines. Both are
    /// admitted first, so either is journaled under its caller (or as refused credentials).
    async fn do_action_fallback(
        &self,
        request: Request<arrow_flight::Action>,
    ) -> Result<Response<DoActionStream>, Status> {
        if request.get_ref().r#type != CLOSE_SESSION {
            return self
                .gate
                .serve(request, Rpc::FlightOtherAction, |_call| async move {
                    Err(CallError::Invalid {
                        code: "unknown-action",
                        message: "this server serves the Flight actions CreatePreparedStatement, \
                                  ClosePreparedStatement and CloseSession only",
                    })
                })
                .await;
        }
        self.gate
            .serve(request, Rpc::FlightCloseSession, |call| async move {
                if CloseSessionRequest::decode(call.message.body.clone()).is_err() {
                    return Err(CallError::Invalid {
                        code: "invalid-action-body",
                        message: "the CloseSession action's body is not a CloseSessionRequest",
                    });
                }
                call.engine
                    .record_call(&call.ctx, Rpc::FlightCloseSession.name())
                    .await?;
                // Nothing is held between calls (a prepared statement's handle is its text, a
                // ticket is a job the caller owns), so the session is closed once asked.
                let result = CloseSessionResult {
                    status: CLOSE_SESSION_CLOSED,
                };
                let answer = arrow_flight::Result {
                    body: Bytes::from(result.encode_to_vec()),
                };
                let stream: DoActionStream = Box::pin(futures::stream::iter([Ok(answer)]));
                Ok(Response::new(stream))
            })
            .await
    }

    /// `ListActions` names `CloseSession` beside Flight SQL's actions.
    async fn list_custom_actions(&self) -> Option<Vec<Result<ActionType, Status>>> {
        Some(vec![Ok(ActionType {
            r#type: CLOSE_SESSION.to_string(),
            description: "Closes the session (the server holds nothing between calls).\n\
                          Request Message: CloseSessionRequest\n\
                          Response Message: CloseSessionResult"
                .to_string(),
        })])
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Whether a parameter binding carries values (any row), read from the messages' headers alone.
/// A binding that cannot be read is refused as `invalid-parameters`.
async fn binds_values(data: PeekableFlightDataStream) -> Result<bool, CallError> {
    // Only whether values came matters (they are refused): each message's header is checked and
    // its row count read from it, and no message reaches Arrow's decoder, which trusts headers
    // (a compressed buffer's claimed size would be allocated) and panics on some forged ones (a
    // panicked call would end without its journal record).
    let mut rows = 0usize;
    let mut messages = 0usize;
    let mut stream = data.into_peekable();
    // Read no further than the first row, nor than a few messages: a client may not stream
    // batches at the server for as long as it likes.
    while let Some(data) = stream.next().await {
        messages += 1;
        if messages > MAX_PARAMETER_MESSAGES {
            rows = rows.max(1);
            break;
        }
        let read = data.map_err(|e| e.to_string()).and_then(|data| {
            sandbox_wasm::untrusted_ipc::ipc_message_rows(&data.data_header, data.data_body.len())
        });
        match read {
            Ok(count) => {
                rows += count;
                if rows > 0 {
                    break;
                }
            }
            Err(_) => {
                return Err(CallError::Invalid {
                    code: "invalid-parameters",
                    message: "the parameter batch cannot be read",
                });
            }
        }
    }
    Ok(rows > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_lists_what_jdbc_tools_read() {
        let info = server_info().expect("server info builds");
        for item in [
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
            SqlInfo::SqlKeywords,
            SqlInfo::SqlNumericFunctions,
            SqlInfo::SqlStringFunctions,
            SqlInfo::SqlSystemFunctions,
            SqlInfo::SqlDatetimeFunctions,
            SqlInfo::SqlIdentifierQuoteChar,
        ] {
            let batch = info.record_batch([item as u32]).expect("filters");
            assert_eq!(batch.num_rows(), 1, "{item:?}");
        }
    }

    #[test]
    fn prepared_statement_schemas_round_trip() {
        let schema = Schema::new(vec![arrow::datatypes::Field::new(
            "n",
            arrow::datatypes::DataType::Int64,
            false,
        )]);
        let bytes = schema_bytes(&schema).expect("encodes");
        let decoded = Schema::try_from(IpcMessage(bytes)).expect("decodes");
        assert_eq!(decoded, schema);
    }
}
