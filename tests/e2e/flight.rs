//! Arrow Flight SQL through `arrow-flight`'s own client: the same answers, denials and journal as
//! the native service, on the same port.

use std::collections::BTreeMap;

use arrow::array::RecordBatch;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    CommandGetDbSchemas, CommandGetTables, CommandStatementQuery, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{FlightData, FlightDescriptor, FlightInfo, HandshakeRequest};
use futures::TryStreamExt;
use prost::Message;
use sandbox_tests::{TestServer, rule_of, sorted_rows};
use tonic::Code;
use tonic::transport::Channel;

use crate::{raw_engine, raw_rows};

async fn channel(server: &TestServer) -> Channel {
    Channel::from_shared(server.url())
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// A Flight SQL client after a handshake with basic credentials.
async fn flight_client(server: &TestServer, name: &str) -> FlightSqlServiceClient<Channel> {
    let mut client = FlightSqlServiceClient::new(channel(server).await);
    let payload = client
        .handshake(name, &server.token(name))
        .await
        .expect("handshake");
    // The answer is the bearer token, in the header (set on the client) and the payload.
    assert_eq!(client.token(), Some(&server.token(name)));
    assert_eq!(payload, server.token(name).as_bytes());
    client
}

/// The messages of a `DoGet`, decoded; with the `app_metadata` of the first (the release summary
/// for a query).
async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: &FlightInfo,
    request_id: &str,
) -> (Vec<RecordBatch>, Vec<u8>) {
    assert_eq!(info.endpoint.len(), 1);
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let mut request = tonic::Request::new(ticket);
    let token = client.token().expect("token").clone();
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().expect("header"));
    let messages: Vec<FlightData> = client
        .inner_mut()
        .do_get(request)
        .await
        .expect("do_get")
        .into_inner()
        .try_collect()
        .await
        .expect("stream");
    let metadata = messages
        .first()
        .map(|m| m.app_metadata.to_vec())
        .unwrap_or_default();
    let batches = arrow_flight::utils::flight_data_to_batches(&messages).expect("decode");
    (batches, metadata)
}

/// A raw `GetFlightInfo` for a query, to see the status a Flight SQL client gets.
async fn flight_info_status(
    server: &TestServer,
    token: &str,
    sql: &str,
) -> Result<FlightInfo, tonic::Status> {
    let command = CommandStatementQuery {
        query: sql.into(),
        transaction_id: None,
    };
    let mut request =
        tonic::Request::new(FlightDescriptor::new_cmd(command.as_any().encode_to_vec()));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    FlightServiceClient::new(channel(server).await)
        .get_flight_info(request)
        .await
        .map(|r| r.into_inner())
}

/// The datasets the native `ListDatasets` shows a principal with the aggregate (SQL) mode:
/// what Flight SQL must list as its tables.
async fn sql_datasets(server: &TestServer, name: &str) -> Vec<String> {
    let mut native = sandbox_tests::Client::connect(&server.url(), &server.token(name))
        .await
        .expect("native client");
    let mut datasets: Vec<String> = native
        .datasets()
        .await
        .expect("datasets")
        .into_iter()
        .filter(|d| d.modes.iter().any(|m| m == "aggregate"))
        .map(|d| d.id)
        .collect();
    datasets.sort();
    datasets
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flight_sql_clients_get_the_sandbox_answers_and_nothing_more() {
    // Exact grants, to compare with raw DataFusion (the demo's noisy default is checked below).
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut client = flight_client(&server, "analyst").await;
    let mut ids: Vec<(String, &str)> = Vec::new();

    // Tables: exactly the datasets the analyst can query with SQL, with their visible columns.
    let id = request_id();
    client.set_header("x-request-id", &id);
    ids.push((id, "FlightSql.GetCatalog"));
    let info = client
        .get_tables(CommandGetTables {
            include_schema: true,
            ..CommandGetTables::default()
        })
        .await
        .expect("tables");
    let id = request_id();
    ids.push((id.clone(), "ListDatasets"));
    let (batches, _) = fetch(&mut client, &info, &id).await;
    let listed: Vec<String> = sorted_rows(&batches)
        .iter()
        .map(|row| {
            let cells: Vec<&str> = row.split('|').collect();
            assert_eq!(&cells[..2], &["datafusion", "public"], "{row}");
            assert_eq!(cells[3], "TABLE");
            cells[2].to_string()
        })
        .collect();
    assert_eq!(listed, sql_datasets(&server, "analyst").await);
    assert!(!listed.contains(&"consents".to_string()));
    // A hidden column is not in the schema a table shows.
    let tables = &batches[0];
    let schemas = tables
        .column_by_name("table_schema")
        .expect("schemas asked for");
    let schemas = schemas
        .as_any()
        .downcast_ref::<arrow::array::BinaryArray>()
        .expect("binary");
    let names = tables
        .column_by_name("table_name")
        .expect("names")
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .expect("strings")
        .clone();
    for row in 0..tables.num_rows() {
        let schema = arrow::datatypes::Schema::try_from(arrow_flight::IpcMessage(
            schemas.value(row).to_vec().into(),
        ))
        .expect("schema");
        let visible = server
            .server
            .engine
            .policy()
            .datasets
            .get(names.value(row))
            .expect("dataset")
            .visible_columns()
            .count();
        assert_eq!(schema.fields().len(), visible, "{}", names.value(row));
    }

    // Catalogs and schemas.
    client.set_header("x-request-id", request_id());
    let info = client.get_catalogs().await.expect("catalogs");
    let (batches, _) = fetch(&mut client, &info, &request_id()).await;
    assert_eq!(sorted_rows(&batches), vec!["datafusion".to_string()]);
    client.set_header("x-request-id", request_id());
    let info = client
        .get_db_schemas(CommandGetDbSchemas::default())
        .await
        .expect("schemas");
    let (batches, _) = fetch(&mut client, &info, &request_id()).await;
    assert_eq!(sorted_rows(&batches), vec!["datafusion|public".to_string()]);
    client.set_header("x-request-id", request_id());
    let info = client
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .expect("sql info");
    let (batches, _) = fetch(&mut client, &info, &request_id()).await;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);

    // An allowed aggregate: the same numbers as raw DataFusion, the schema announced first.
    let sql = "SELECT size_class, COUNT(*) AS n, SUM(registered_capital) AS capital FROM enterprises GROUP BY size_class";
    let id = request_id();
    client.set_header("x-request-id", &id);
    ids.push((id.clone(), "SubmitJob"));
    let info = client.execute(sql.into(), None).await.expect("allowed");
    let announced = info.clone().try_decode_schema().expect("schema");
    // Admitted, not run: the job ends only once DoGet asks for it.
    let mut auditor = server.client("auditor").await.expect("auditor");
    let before: Vec<String> = auditor
        .events(1, 10_000, false)
        .await
        .expect("journal")
        .into_iter()
        .filter(|e| e.request_id == id)
        .map(|e| e.action)
        .collect();
    assert_eq!(before, vec!["AdmitJob".to_string()]);
    let id = request_id();
    ids.push((id.clone(), "FetchResult"));
    let (batches, metadata) = fetch(&mut client, &info, &id).await;
    assert_eq!(batches[0].schema().as_ref(), &announced);
    assert_eq!(sorted_rows(&batches), raw_rows(&raw, sql).await);
    let summary: serde_json::Value = serde_json::from_slice(&metadata).expect("summary json");
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(summary["rows_released"], rows as u64);
    // Counts of suppressed, withheld or scanned rows are the journal's, never the caller's.
    assert!(summary.get("rows_suppressed").is_none(), "{summary}");
    assert!(summary.get("rows_scanned").is_none(), "{summary}");

    // The same query as a prepared statement (what JDBC sends), its schema known at prepare.
    // The statement keeps a copy of the client's headers: no fixed request id from here on (one
    // that is not a UUID is replaced by a fresh one).
    client.set_header("x-request-id", "fresh");
    let mut prepared = client.prepare(sql.into(), None).await.expect("prepare");
    assert_eq!(prepared.dataset_schema().expect("schema"), &announced);
    let info = prepared.execute().await.expect("execute prepared");
    let (batches, _) = fetch(&mut client, &info, &request_id()).await;
    assert_eq!(sorted_rows(&batches), raw_rows(&raw, sql).await);
    prepared.close().await.expect("close");
    // Values bound to parameters are refused: the guard checks a query as written.
    let mut prepared = client
        .prepare(
            "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class".into(),
            None,
        )
        .await
        .expect("prepare");
    let parameters = RecordBatch::try_from_iter([(
        "$1",
        std::sync::Arc::new(arrow::array::Int64Array::from(vec![1])) as arrow::array::ArrayRef,
    )])
    .expect("batch");
    prepared.set_parameters(parameters).expect("bind");
    let error = prepared.execute().await.expect_err("parameters refused");
    assert!(
        error.to_string().contains("parameters-not-supported"),
        "{error}"
    );

    // A suppressed group: a rating held by fewer than 10 enterprises is absent (and so is one
    // more, the smallest, when the small groups cover fewer than 10 enterprises together: a
    // total minus the released rows would give them away).
    let sql = "SELECT tax_credit_rating, COUNT(*) AS n FROM tax_monthly GROUP BY tax_credit_rating";
    let truth = raw_rows(
        &raw,
        "SELECT tax_credit_rating, COUNT(*), COUNT(DISTINCT credit_code) FROM tax_monthly GROUP BY tax_credit_rating",
    )
    .await;
    let mut expected = BTreeMap::new();
    let mut small = 0u64;
    let mut small_units = 0u64;
    for row in truth {
        let cells: Vec<&str> = row.split('|').collect();
        let units: u64 = cells[2].parse().expect("units");
        if units >= 10 {
            expected.insert(cells[0].to_string(), cells[1].to_string());
        } else {
            small += 1;
            small_units += units;
        }
    }
    assert!(small > 0, "the test data has a small group");
    client.set_header("x-request-id", request_id());
    let info = client.execute(sql.into(), None).await.expect("allowed");
    let (batches, metadata) = fetch(&mut client, &info, &request_id()).await;
    let released: BTreeMap<String, String> = sorted_rows(&batches)
        .into_iter()
        .map(|row| {
            let (key, n) = row.split_once('|').expect("two cells");
            (key.to_string(), n.to_string())
        })
        .collect();
    let complement = usize::from(small_units < 10);
    assert_eq!(released.len() + complement, expected.len(), "{released:?}");
    assert!(released.iter().all(|(k, v)| expected.get(k) == Some(v)));
    let summary: serde_json::Value = serde_json::from_slice(&metadata).expect("summary json");
    assert_eq!(summary["rows_released"], released.len() as u64);

    // Denials: the status a Flight client gets names the rule, at GetFlightInfo and at prepare.
    let token = server.token("analyst");
    for (sql, rule) in [
        ("SELECT * FROM enterprises", "identifier-output"),
        ("SELECT COUNT(*) FROM consents", "dataset-not-granted"),
        ("DROP TABLE enterprises", "statement-not-query"),
    ] {
        let status = flight_info_status(&server, &token, sql)
            .await
            .expect_err("denied");
        assert_eq!(status.code(), Code::FailedPrecondition, "{sql}");
        assert_eq!(rule_of(&status), rule, "{sql}");
        assert!(status.message().contains(rule), "{}", status.message());
        let error = client
            .prepare(sql.into(), None)
            .await
            .expect_err("denied at prepare");
        assert!(error.to_string().contains(rule), "{error}");
    }

    // Bad credentials: a wrong password, another principal's token, none at all.
    let mut raw_client = FlightServiceClient::new(channel(&server).await);
    for (authorization, rule) in [
        (basic("analyst", "not-the-token"), "unknown-token"),
        (basic("bank", &token), "credential-mismatch"),
        ("Basic !!".to_string(), "malformed-credentials"),
    ] {
        let mut request = tonic::Request::new(futures::stream::iter([HandshakeRequest::default()]));
        request
            .metadata_mut()
            .insert("authorization", authorization.parse().expect("header"));
        let id = request_id();
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().expect("header"));
        ids.push((id, "FlightSql.Handshake"));
        let status = raw_client.handshake(request).await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization}");
        assert_eq!(rule_of(&status), rule);
    }
    let status = flight_info_status(&server, "sbx_forged", "SELECT COUNT(*) FROM enterprises")
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
    // An auditor may not run queries through Flight either.
    let status = flight_info_status(
        &server,
        &server.token("auditor"),
        "SELECT COUNT(*) FROM enterprises",
    )
    .await
    .expect_err("refused");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(rule_of(&status), "role-not-permitted");

    // A ticket this server did not issue: refused, and journaled like any admitted call.
    let forged = TicketStatementQuery {
        statement_handle: vec![0xff, 0xfe].into(),
    };
    let mut request =
        tonic::Request::new(arrow_flight::Ticket::new(forged.as_any().encode_to_vec()));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let id = request_id();
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("header"));
    ids.push((id, "FlightSql.DoGet"));
    let status = raw_client.do_get(request).await.expect_err("forged ticket");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(rule_of(&status), "invalid-ticket");

    // Every call above has exactly one terminal event, the one the native path records.
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    for (id, action) in &ids {
        let terminal: Vec<_> = events
            .iter()
            .filter(|e| &e.request_id == id && e.action != "AdmitJob")
            .collect();
        assert_eq!(terminal.len(), 1, "{action}: {terminal:#?}");
        assert_eq!(terminal[0].action, *action);
    }
    server.server.shutdown().await.expect("shutdown");
}

/// A ticket nobody fetches does not run, ends with its own terminal event and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfetched_ticket_ends_unrun() {
    let server = TestServer::start_with(|config| config.query_timeout_secs = 1)
        .await
        .expect("server");
    let mut client = flight_client(&server, "analyst").await;
    let id = request_id();
    client.set_header("x-request-id", &id);
    let info = client
        .execute(
            "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class".into(),
            None,
        )
        .await
        .expect("admitted");
    assert_eq!(server.server.engine.running_jobs(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(server.server.engine.running_jobs(), 0, "the slot is free");
    let ticket = info.endpoint[0].ticket.clone().expect("ticket");
    let error = client
        .do_get(ticket)
        .await
        .expect_err("not fetched in time");
    assert!(error.to_string().contains("not-fetched"), "{error}");
    let mut auditor = server.client("auditor").await.expect("auditor");
    let ended: Vec<_> = auditor
        .events(1, 10_000, false)
        .await
        .expect("journal")
        .into_iter()
        .filter(|e| e.request_id == id && e.action == "SubmitJob")
        .collect();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert_eq!(ended[0].decision, "cancel");
    assert_eq!(ended[0].rule, "not-fetched");
    assert_eq!(ended[0].rows_scanned, 0, "the query did not run");
    server.server.shutdown().await.expect("shutdown");
}

/// A parameter batch whose LZ4 buffers claim 16 TB uncompressed (what an attacker sends to make
/// the reader allocate them, and the allocation failure abort the process) is refused before it
/// is decoded, as are forged headers, each journaled, and the server keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_compressed_parameter_batch_is_refused_before_it_is_read() {
    use arrow::ipc::writer::IpcWriteOptions;
    use arrow_flight::Action;
    use arrow_flight::encode::FlightDataEncoderBuilder;
    use arrow_flight::sql::{
        ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
        CommandPreparedStatementQuery,
    };

    let server = TestServer::start().await.expect("server");
    let mut raw = FlightServiceClient::new(channel(&server).await);
    let bearer = format!("Bearer {}", server.token("analyst"));
    fn authorized<T>(message: T, bearer: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", bearer.parse().expect("header"));
        request
    }
    let create = Action {
        r#type: "CreatePreparedStatement".into(),
        body: ActionCreatePreparedStatementRequest {
            query: "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class".into(),
            transaction_id: None,
        }
        .as_any()
        .encode_to_vec()
        .into(),
    };
    let result = raw
        .do_action(authorized(create, &bearer))
        .await
        .expect("prepare")
        .into_inner()
        .message()
        .await
        .expect("answer")
        .expect("one result");
    let prepared: ActionCreatePreparedStatementResult = Any::decode(result.body)
        .expect("any")
        .unpack()
        .expect("unpack")
        .expect("a prepared statement");

    let parameters = RecordBatch::try_from_iter([(
        "$1",
        std::sync::Arc::new(arrow::array::Int64Array::from_iter_values(0..1000))
            as arrow::array::ArrayRef,
    )])
    .expect("batch");
    let prepared_handle = prepared.prepared_statement_handle;
    let descriptor = FlightDescriptor::new_cmd(
        CommandPreparedStatementQuery {
            prepared_statement_handle: prepared_handle.clone(),
        }
        .as_any()
        .encode_to_vec(),
    );
    let compressed = IpcWriteOptions::default()
        .try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))
        .expect("lz4");
    let mut messages: Vec<FlightData> = FlightDataEncoderBuilder::new()
        .with_options(compressed)
        .with_flight_descriptor(Some(descriptor))
        .build(futures::stream::iter([Ok(parameters)]))
        .try_collect()
        .await
        .expect("encode");
    // Every compressed buffer starts with its uncompressed length: claim 2^44 bytes.
    let mut forged = 0;
    for message in &mut messages {
        let Ok(header) = arrow::ipc::root_as_message(&message.data_header) else {
            continue;
        };
        let Some(batch) = header.header_as_record_batch() else {
            continue;
        };
        assert!(batch.compression().is_some(), "the batch is compressed");
        let mut body = message.data_body.to_vec();
        for buffer in batch.buffers().expect("buffers") {
            let (offset, length) = (buffer.offset() as usize, buffer.length() as usize);
            if length >= 8 {
                body[offset..offset + 8].copy_from_slice(&(1u64 << 44).to_le_bytes());
                forged += 1;
            }
        }
        message.data_body = body.into();
    }
    assert!(forged > 0, "no buffer forged: the test proves nothing");
    let error = raw
        .do_put(authorized(futures::stream::iter(messages), &bearer))
        .await
        .map(|r| r.into_inner())
        .expect_err("refused");
    assert!(error.message().contains("invalid-parameters"), "{error:?}");

    // Headers with a few bytes changed (a fresh attacker's fuzzer made Arrow's reader panic on
    // some forged schemas, and a panicked call had no journal record): every call gets an answer
    // of its own, and exactly one terminal event.
    let plain: Vec<FlightData> = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_cmd(
            CommandPreparedStatementQuery {
                prepared_statement_handle: prepared_handle.clone(),
            }
            .as_any()
            .encode_to_vec(),
        )))
        .build(futures::stream::iter([Ok(RecordBatch::try_from_iter([(
            "$1",
            std::sync::Arc::new(arrow::array::BooleanArray::from(vec![true, false, true]))
                as arrow::array::ArrayRef,
        )])
        .expect("batch"))]))
        .try_collect()
        .await
        .expect("encode");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut ids = Vec::new();
    for _ in 0..300 {
        let mut messages = plain.clone();
        let which = (next() % messages.len() as u64) as usize;
        let mut header = messages[which].data_header.to_vec();
        for _ in 0..1 + next() % 3 {
            let at = (next() % header.len() as u64) as usize;
            header[at] = next() as u8;
        }
        messages[which].data_header = header.into();
        let id = request_id();
        let mut request = authorized(futures::stream::iter(messages), &bearer);
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().expect("header"));
        if let Err(status) = raw.do_put(request).await.map(|r| r.into_inner()) {
            assert!(
                matches!(
                    status.code(),
                    Code::InvalidArgument | Code::FailedPrecondition
                ),
                "{status:?}"
            );
        }
        ids.push(id);
    }
    let mut auditor = server.client("auditor").await.expect("auditor");
    let events = auditor.events(1, 100_000, false).await.expect("journal");
    for id in &ids {
        let terminal = events
            .iter()
            .filter(|e| &e.request_id == id && e.action != "AdmitJob")
            .count();
        assert_eq!(terminal, 1, "request {id}");
    }

    // Still up: the same statement without parameters answers.
    let mut client = flight_client(&server, "analyst").await;
    let info = client
        .execute(
            "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class".into(),
            None,
        )
        .await
        .expect("the server still answers");
    let (batches, _) = fetch(&mut client, &info, &request_id()).await;
    assert!(!batches.is_empty());
    server.server.shutdown().await.expect("shutdown");
}

/// Requests Flight SQL's own dispatch answers before any handler runs (an undecodable ticket or
/// action, an unknown action, methods it leaves unimplemented, `ListActions`), with or without
/// credentials, are journaled like any other call: one terminal event each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_the_flight_framework_answers_are_journaled() {
    use arrow_flight::{Action, Criteria, Empty};
    let server = TestServer::start().await.expect("server");
    let mut raw = FlightServiceClient::new(channel(&server).await);
    let bearer = format!("Bearer {}", server.token("analyst"));
    let mut ids = Vec::new();
    fn with_headers<T>(
        message: T,
        authorization: Option<&str>,
        ids: &mut Vec<String>,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let id = request_id();
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().expect("header"));
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().expect("header"));
        }
        ids.push(id);
        request
    }
    for authorization in [None, Some("Bearer nope"), Some(bearer.as_str())] {
        macro_rules! request {
            ($message:expr) => {
                with_headers($message, authorization, &mut ids)
            };
        }
        let _ = raw.list_actions(request!(Empty {})).await;
        let _ = raw
            .do_get(request!(arrow_flight::Ticket::new([0u8, 0xff].repeat(10))))
            .await;
        let _ = raw
            .do_action(request!(Action::new("Nope", Vec::<u8>::new())))
            .await;
        let _ = raw
            .do_action(request!(Action::new(
                "CreatePreparedStatement",
                vec![0xffu8, 0xff],
            )))
            .await;
        let _ = raw.list_flights(request!(Criteria::default())).await;
        let _ = raw
            .get_schema(request!(FlightDescriptor::new_cmd(vec![1u8, 2, 3])))
            .await;
    }
    let mut auditor = server.client("auditor").await.expect("auditor");
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    for id in &ids {
        let terminal: Vec<_> = events
            .iter()
            .filter(|e| &e.request_id == id && e.action != "AdmitJob")
            .collect();
        assert_eq!(terminal.len(), 1, "request {id}: {terminal:#?}");
        assert!(terminal[0].action.starts_with("Flight"), "{terminal:#?}");
    }
    server.server.shutdown().await.expect("shutdown");
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A virtual environment with the pinned ADBC driver, pandas and pyarrow from PyPI, built once
/// per target dir (kept while `requirements.txt` is unchanged).
fn python_with_adbc() -> std::path::PathBuf {
    let requirements = repository().join("examples/python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements");
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("adbc-venv");
    let python = venv.join("bin/python");
    let marker = venv.join("installed-requirements.txt");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let run = |program: &std::path::Path, args: &[&str]| {
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(status.success(), "{} {args:?} failed", program.display());
    };
    run(
        std::path::Path::new("python3"),
        &["-m", "venv", venv.to_str().expect("utf8")],
    );
    run(
        &python,
        &[
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            requirements.to_str().expect("utf8"),
        ],
    );
    std::fs::write(&marker, wanted).expect("marker");
    python
}

/// Runs a process to its end off the runtime's threads (the server under test runs on them).
async fn run(mut command: std::process::Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || command.output().expect("the process starts"))
        .await
        .expect("joined")
}

fn repository() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The real Python ADBC Flight SQL driver, as an analyst's notebook would use it: connect, list
/// tables, an aggregate with the right numbers, a suppressed group, a denial naming its rule, a
/// bad password. Then the example script itself runs to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_adbc_driver_sees_the_same_sandbox() {
    let python = tokio::task::spawn_blocking(python_with_adbc)
        .await
        .expect("venv");
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let url = format!("grpc://{}", server.server.addr);
    let token = server.token("analyst");
    let aggregate = "SELECT size_class, COUNT(*) AS n, COUNT(DISTINCT credit_code) AS units, SUM(registered_capital) AS capital FROM enterprises GROUP BY size_class";
    let suppressed = "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS units FROM tax_monthly GROUP BY tax_credit_rating";
    let queries = serde_json::json!({
        "aggregate": aggregate,
        "suppressed": suppressed,
        "denied": "SELECT * FROM enterprises",
    });
    let examples = repository().join("examples/python");
    let script = repository().join("tests/e2e/adbc_check.py");
    let mut command = std::process::Command::new(&python);
    command
        .arg(&script)
        .args([&url, "analyst", &token, &queries.to_string()])
        .arg(&examples);
    let output = run(command).await;
    assert!(
        output.status.success(),
        "adbc_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");

    assert_eq!(
        seen["tables"],
        serde_json::json!(sql_datasets(&server, "analyst").await)
    );

    // The aggregate, against raw DataFusion: counts exact, sums to the last representable digit.
    let truth = raw_rows(&raw, aggregate).await;
    let rows = seen["aggregate"].as_array().expect("rows");
    assert_eq!(rows.len(), truth.len());
    for row in rows {
        let class = row["size_class"].as_str().expect("class");
        let expected = truth
            .iter()
            .find(|r| r.starts_with(&format!("{class}|")))
            .unwrap_or_else(|| panic!("{class} in the truth"));
        let cells: Vec<&str> = expected.split('|').collect();
        assert_eq!(row["n"].to_string(), cells[1], "{class}");
        assert_eq!(row["units"].to_string(), cells[2], "{class}");
        let capital: f64 = cells[3].parse().expect("float");
        let seen_capital = row["capital"].as_f64().expect("float");
        assert!(
            (seen_capital - capital).abs() <= capital.abs() * 1e-9,
            "{class}: {seen_capital} vs {capital}"
        );
    }

    // The suppressed group: every rating of fewer than 10 enterprises is absent.
    let truth = raw_rows(&raw, suppressed).await;
    let mut expected: Vec<serde_json::Value> = Vec::new();
    let mut withheld = 0;
    let mut withheld_units = 0;
    for row in &truth {
        let (rating, units) = row.split_once('|').expect("two cells");
        let units: u64 = units.parse().expect("count");
        if units >= 10 {
            expected.push(serde_json::json!({"tax_credit_rating": rating, "units": units}));
        } else {
            withheld += 1;
            withheld_units += units;
        }
    }
    assert!(withheld > 0, "the test data has a rating held by few");
    let released = seen["suppressed"].as_array().expect("rows").clone();
    // One more withheld when the small ratings cover fewer than 10 enterprises together.
    let complement = usize::from(withheld_units < 10);
    assert_eq!(released.len() + complement, expected.len(), "{released:?}");
    assert!(
        released.iter().all(|r| expected.contains(r)),
        "{released:?}"
    );

    let denied = seen["denied"].as_str().expect("refused");
    assert!(denied.contains("identifier-output"), "{denied}");
    let bad = seen["bad_password"].as_str().expect("refused");
    assert!(
        bad.contains("UNAUTHENTICATED") && bad.contains("unknown-token"),
        "{bad}"
    );

    // The analyst's example runs against the same server.
    let token_file = server.data_dir().join("credentials/analyst.token");
    let mut command = std::process::Command::new(&python);
    command
        .arg(examples.join("flight_sql_analyst.py"))
        .args(["--url", &url, "--user", "analyst", "--token-file"])
        .arg(&token_file);
    let example = run(command).await;
    let printed = String::from_utf8_lossy(&example.stdout);
    assert!(
        example.status.success(),
        "example failed: {printed}{}",
        String::from_utf8_lossy(&example.stderr)
    );
    assert!(printed.contains("refused:") && printed.contains("identifier-output"));

    // A wrong address or scheme is explained, with the option that fixes it, not a traceback.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    for (url, says) in [
        (format!("grpc://127.0.0.1:{closed}"), "nothing is listening"),
        (
            format!("grpc+tls://{}", server.server.addr),
            "does not speak TLS",
        ),
    ] {
        let mut command = std::process::Command::new(&python);
        command
            .arg(examples.join("flight_sql_analyst.py"))
            .args(["--url", &url, "--user", "analyst", "--token-file"])
            .arg(&token_file);
        let failed = run(command).await;
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert_eq!(failed.status.code(), Some(5), "{url}: {stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
        assert!(!stderr.contains("Traceback"), "{url}: {stderr}");
    }
    server.server.shutdown().await.expect("shutdown");
}
