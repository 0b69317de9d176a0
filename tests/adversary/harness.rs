//! The adversary's toolbox: a demo sandbox of its own, clients for every principal (native gRPC
//! and Arrow Flight SQL), the ground truth read straight from the Parquet files the sandbox
//! serves, and the judge that compares what an attack recovered with that truth.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use arrow::array::{Array, RecordBatch};
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightData, FlightInfo};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use sandbox_proto::v1 as pb;
use sandbox_tests::{Client, TestServer, rule_of};
use tonic::transport::Channel;

/// Which deployment the adversary attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The embedded demo as shipped: its policies, its templates, its consents.
    Demo,
    /// The demo with the analyst's grants on `enterprises` and `tax_monthly` marked exact by their
    /// owners: the defenses of exact answers (threshold, differencing, query shapes) alone.
    ExactGrants,
}

/// How a query reaches the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Native,
    Flight,
}

/// One cell of an answer, as the adversary reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Num(f64),
    Text(String),
    Null,
}

impl Cell {
    pub fn num(&self) -> Option<f64> {
        match self {
            Cell::Num(v) => Some(*v),
            Cell::Text(t) => t.parse().ok(),
            Cell::Null => None,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Cell::Num(v) => format!("{v}"),
            Cell::Text(t) => t.clone(),
            Cell::Null => "NULL".into(),
        }
    }
}

/// A released answer: its rows by column name, and the summary the caller was told.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub rows: Vec<BTreeMap<String, Cell>>,
    pub summary: Option<pb::ReleaseSummary>,
    /// The sandbox said the values carry noise (differential privacy): a value that happens to
    /// equal the truth is chance, not a recovery (the noise itself is tested statistically in
    /// `sandbox-release`; averaging it away is what classes 7 and 29 attack).
    pub noisy: bool,
}

impl Answer {
    fn from_batches(batches: &[RecordBatch], summary: Option<pb::ReleaseSummary>) -> Self {
        let noisy = summary.as_ref().is_some_and(|s| s.dp.is_some());
        let mut rows = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                let mut cells = BTreeMap::new();
                for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
                    cells.insert(field.name().clone(), cell(column.as_ref(), row));
                }
                rows.push(cells);
            }
        }
        Answer {
            rows,
            summary,
            noisy,
        }
    }

    /// The value of `column` in the first row, as a number.
    pub fn value(&self, column: &str) -> Option<f64> {
        self.rows.first()?.get(column)?.num()
    }

    /// The value of `column` in the row whose other columns equal `key` (all of them).
    pub fn value_where(&self, column: &str, key: &[(&str, &str)]) -> Option<f64> {
        self.rows
            .iter()
            .find(|row| {
                key.iter()
                    .all(|(k, v)| row.get(*k).is_some_and(|c| c.text() == *v))
            })?
            .get(column)?
            .num()
    }

    /// The sum of `column` over every released row.
    pub fn sum(&self, column: &str) -> f64 {
        self.rows
            .iter()
            .filter_map(|row| row.get(column).and_then(Cell::num))
            .sum()
    }

    /// Whether any cell of the answer shows this text (a raw identifier, say).
    pub fn shows_text(&self, text: &str) -> bool {
        self.rows
            .iter()
            .any(|row| row.values().any(|c| c.text().contains(text)))
    }

    /// Whether any numeric cell equals this value exactly (a raw measure, say).
    pub fn shows_value(&self, value: f64) -> bool {
        self.rows.iter().any(|row| {
            row.values()
                .any(|c| c.num().is_some_and(|v| (v - value).abs() <= 1e-6))
        })
    }
}

/// The rows of one batch by column name.
pub fn rows_of(batch: &RecordBatch) -> Vec<BTreeMap<String, Cell>> {
    Answer::from_batches(std::slice::from_ref(batch), None).rows
}

fn cell(column: &dyn Array, row: usize) -> Cell {
    use arrow::datatypes::DataType;
    if column.is_null(row) {
        return Cell::Null;
    }
    let text = arrow::util::display::array_value_to_string(column, row).unwrap_or_default();
    match column.data_type() {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(..) => text.parse().map_or(Cell::Text(text), Cell::Num),
        _ => Cell::Text(text),
    }
}

/// What became of one attack.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The attack recovered a hidden value (or broke a guarantee): what it got, and the truth.
    Leak { recovered: String, truth: String },
    /// It did not: why, in a few words.
    Safe(String),
    /// It did, on a deployment that accepted it: an owner who marks a grant exact answers freely
    /// chosen questions exactly, and enough exact answers always combine to individual values
    /// (README, "What the sandbox promises"). Reported, never hidden; not a failure of the
    /// defenses the profile tests.
    Limit { recovered: String, truth: String },
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub class: u8,
    pub attack: String,
    pub queries: usize,
    pub verdict: Verdict,
}

/// The ground truth: every dataset of the data dir as a plain DataFusion table, hidden columns
/// included, with nothing in between.
pub struct Truth {
    ctx: SessionContext,
}

impl Truth {
    async fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let ctx = SessionContext::new();
        for entry in std::fs::read_dir(data_dir.join("datasets"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            ctx.register_parquet(
                &name,
                entry.path().to_str().expect("utf-8 path"),
                ParquetReadOptions::default(),
            )
            .await?;
        }
        Ok(Truth { ctx })
    }

    /// Rows of a query over the raw tables, each cell as text (`NULL` for nulls).
    pub async fn rows(&self, sql: &str) -> Vec<Vec<String>> {
        let batches = self
            .ctx
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("truth query `{sql}`: {e}"))
            .collect()
            .await
            .unwrap_or_else(|e| panic!("truth query `{sql}`: {e}"));
        let mut rows = Vec::new();
        for batch in &batches {
            for row in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .map(|c| cell(c.as_ref(), row).text())
                        .collect(),
                );
            }
        }
        rows
    }

    /// The one number a query over the raw tables answers.
    pub async fn value(&self, sql: &str) -> f64 {
        let rows = self.rows(sql).await;
        rows.first()
            .and_then(|r| r.first())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("truth query `{sql}` answered {rows:?}"))
    }
}

/// Query counts per attack, and the answers' sequence, for the report.
pub struct Harness {
    pub profile: Profile,
    /// The full set of variants at the demo's scale, or the bounded one CI runs.
    pub full: bool,
    pub server: TestServer,
    _policies: Option<tempfile::TempDir>,
    pub truth: Truth,
    /// Placeholders for attack texts: the targets' attributes, months, predicates.
    pub vars: BTreeMap<String, String>,
    clients: HashMap<String, Client>,
    flights: HashMap<String, FlightSqlServiceClient<Channel>>,
    pub findings: Vec<Finding>,
    /// Queries sent by the attack being played (reset by [`Harness::record`]).
    pub sent: usize,
    pub total_sent: usize,
    /// Whether this build accepts grants marked exact (an older one answers exactly anyway).
    pub exact_marking: bool,
    started: Instant,
}

/// Demo scale of a bounded run (1,000 enterprises) and of a full run (the demo's default).
const BOUNDED_SCALE: f64 = 0.05;
const FULL_SCALE: f64 = 1.0;

impl Harness {
    pub async fn start(profile: Profile) -> anyhow::Result<Harness> {
        let full = std::env::var("ADVERSARY_FULL").is_ok_and(|v| v == "1");
        let scale = if full { FULL_SCALE } else { BOUNDED_SCALE };
        let (policies, exact_marking) = match profile {
            Profile::Demo => (None, false),
            Profile::ExactGrants => {
                let dir = exact_policies()?;
                let accepted = sandbox_policy::load_dir(dir.path()).is_ok();
                (accepted.then_some(dir), accepted)
            }
        };
        let policy_dir = policies.as_ref().map(|d| d.path().to_path_buf());
        let server = TestServer::start_with(|config| {
            config.demo_scale = scale;
            // Many queries from one principal: the adversary is patient, not throttled.
            config.rate_limit = 100_000;
            config.rate_burst = 100_000;
            if let Some(dir) = policy_dir {
                config.policies = Some(dir);
            }
        })
        .await?;
        let truth = Truth::open(&server.data_dir()).await?;
        let mut harness = Harness {
            profile,
            full,
            server,
            _policies: policies,
            truth,
            vars: BTreeMap::new(),
            clients: HashMap::new(),
            flights: HashMap::new(),
            findings: Vec::new(),
            sent: 0,
            total_sent: 0,
            exact_marking,
            started: Instant::now(),
        };
        crate::targets::choose(&mut harness).await;
        Ok(harness)
    }

    /// A native client of a demo principal (one per principal, kept).
    pub async fn client(&mut self, who: &str) -> Client {
        if !self.clients.contains_key(who) {
            let client = self.server.client(who).await.expect("client connects");
            self.clients.insert(who.to_string(), client);
        }
        self.clients[who].clone()
    }

    /// A query over the native API: its release, or the rule that refused it.
    pub async fn sql(&mut self, who: &str, sql: &str) -> Result<Answer, String> {
        self.sent += 1;
        let mut client = self.client(who).await;
        match client.sql(sql).await {
            Ok(result) => Ok(Answer::from_batches(&result.batches, Some(result.summary))),
            Err(status) => Err(refusal(&status)),
        }
    }

    /// The same question under differential privacy explicitly (the grant's epsilon).
    pub async fn dp_sql(&mut self, who: &str, sql: &str) -> Result<Answer, String> {
        self.sent += 1;
        let mut client = self.client(who).await;
        match client.run(Client::dp_spec(sql, None)).await {
            Ok(result) => Ok(Answer::from_batches(&result.batches, Some(result.summary))),
            Err(status) => Err(refusal(&status)),
        }
    }

    /// A query over Flight SQL (`GetFlightInfo`, then `DoGet` of its ticket).
    pub async fn flight_sql(&mut self, who: &str, sql: &str) -> Result<Answer, String> {
        self.sent += 1;
        if !self.flights.contains_key(who) {
            let channel = Channel::from_shared(self.server.url())
                .expect("url")
                .connect()
                .await
                .expect("connect");
            let mut client = FlightSqlServiceClient::new(channel);
            client
                .handshake(who, &self.server.token(who))
                .await
                .expect("handshake");
            self.flights.insert(who.to_string(), client);
        }
        let client = self.flights.get_mut(who).expect("flight client");
        let info: FlightInfo = match client.execute(sql.to_string(), None).await {
            Ok(info) => info,
            Err(error) => return Err(flight_refusal(&error)),
        };
        let Some(ticket) = info.endpoint.first().and_then(|e| e.ticket.clone()) else {
            return Err("no-ticket".into());
        };
        let mut request = tonic::Request::new(ticket);
        let token = client.token().expect("token").clone();
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let stream = match client.inner_mut().do_get(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => return Err(refusal(&status)),
        };
        let messages: Vec<FlightData> = match stream.try_collect().await {
            Ok(messages) => messages,
            Err(status) => return Err(refusal(&status)),
        };
        let batches = arrow_flight::utils::flight_data_to_batches(&messages)
            .map_err(|e| format!("undecodable: {e}"))?;
        // The release summary travels as JSON in the first message's app_metadata.
        let noisy = messages
            .first()
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m.app_metadata).ok())
            .is_some_and(|summary| !summary["dp"].is_null());
        Ok(Answer {
            noisy,
            ..Answer::from_batches(&batches, None)
        })
    }

    pub async fn query(&mut self, who: &str, via: Via, sql: &str) -> Result<Answer, String> {
        match via {
            Via::Native => self.sql(who, sql).await,
            Via::Flight => self.flight_sql(who, sql).await,
        }
    }

    /// Replaces `{name}` placeholders with the targets' attributes; `{T:alias}` with the target's
    /// unique combination of public dimensions on that table alias.
    pub fn fill(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let Some(end) = rest[start..].find('}') else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let name = &rest[start + 1..start + end];
            match self.vars.get(name) {
                Some(value) => out.push_str(value),
                // The free variable of a binary search stays for the search to fill.
                None if name == "k" => out.push_str("{k}"),
                None => match name.split_once(':') {
                    Some((predicate, alias)) if self.vars.contains_key(predicate) => {
                        out.push_str(&self.vars[predicate].replace("@.", &format!("{alias}.")))
                    }
                    _ => panic!("unknown placeholder `{name}` in `{text}`"),
                },
            }
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        out.replace("@.", "")
    }

    /// Records an attack's outcome; the queries it sent are counted from the last record.
    pub fn record(&mut self, class: u8, attack: impl Into<String>, verdict: Verdict) {
        let attack = attack.into();
        match &verdict {
            Verdict::Leak { recovered, truth } => {
                eprintln!(
                    "  LEAK  class {class:>2} {attack}: recovered {recovered}, truth {truth} ({} queries)",
                    self.sent
                )
            }
            Verdict::Safe(note) => eprintln!(
                "  safe  class {class:>2} {attack}: {note} ({} queries)",
                self.sent
            ),
            Verdict::Limit { recovered, truth } => eprintln!(
                "  LIMIT class {class:>2} {attack}: recovered {recovered}, truth {truth} ({} \
                 queries; exact grants answer freely chosen questions exactly, by the owner's \
                 choice)",
                self.sent
            ),
        }
        self.findings.push(Finding {
            class,
            attack,
            queries: self.sent,
            verdict,
        });
        self.total_sent += self.sent;
        self.sent = 0;
    }

    /// Judges a number recovered from noisy answers: never exact by design, so a match is chance
    /// (reported, not a leak); how far off it is, is.
    pub fn judge_noisy(
        &mut self,
        class: u8,
        attack: impl Into<String>,
        recovered: Result<f64, String>,
        truth: f64,
    ) {
        let verdict = match recovered {
            Ok(value) => Verdict::Safe(format!(
                "answered with noise: recovered {value:.2}, off by {:.2} (a match would be \
                 chance)",
                (value - truth).abs()
            )),
            Err(why) => Verdict::Safe(why),
        };
        self.record(class, attack, verdict);
    }

    /// Turns a leak into the documented limit of exact grants, on the profile that has them.
    pub fn as_exact_limit(&self, verdict: Verdict) -> Verdict {
        match verdict {
            Verdict::Leak { recovered, truth } if self.profile == Profile::ExactGrants => {
                Verdict::Limit { recovered, truth }
            }
            other => other,
        }
    }

    /// Judges a recovered number against the truth: a leak when it is within `tolerance`.
    pub fn judge(
        &mut self,
        class: u8,
        attack: impl Into<String>,
        recovered: Result<f64, String>,
        truth: f64,
        tolerance: f64,
    ) {
        self.record(class, attack, verdict(recovered, truth, tolerance));
    }

    /// The report, and the test's verdict: no attack may leak.
    pub fn report_and_assert(&self) {
        let leaks: Vec<&Finding> = self
            .findings
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Leak { .. }))
            .collect();
        let mut per_class: BTreeMap<u8, (usize, usize, usize, usize)> = BTreeMap::new();
        for finding in &self.findings {
            let entry = per_class.entry(finding.class).or_default();
            entry.0 += 1;
            entry.1 += usize::from(matches!(finding.verdict, Verdict::Leak { .. }));
            entry.2 += usize::from(matches!(finding.verdict, Verdict::Limit { .. }));
            entry.3 += finding.queries;
        }
        let limits = self
            .findings
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Limit { .. }))
            .count();
        eprintln!(
            "\nadversary report ({:?}{}, {} enterprises at this scale): {} attacks, {} leaks, \
             {limits} documented limits, {} queries, {:.0?}",
            self.profile,
            if self.full { ", full" } else { ", bounded" },
            self.vars.get("enterprises").map_or("?", String::as_str),
            self.findings.len(),
            leaks.len(),
            self.total_sent,
            self.started.elapsed()
        );
        eprintln!("class  attacks  leaks  limits  queries");
        for (class, (attacks, leaked, limited, queries)) in &per_class {
            eprintln!("{class:>5}  {attacks:>7}  {leaked:>5}  {limited:>6}  {queries:>7}");
        }
        assert!(
            leaks.is_empty(),
            "{} attacks recovered hidden values:\n{}",
            leaks.len(),
            leaks
                .iter()
                .map(|f| format!("  class {} {}: {:?}", f.class, f.attack, f.verdict))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// A leak when the recovered number is within `tolerance` of the truth.
pub fn verdict(recovered: Result<f64, String>, truth: f64, tolerance: f64) -> Verdict {
    match recovered {
        Ok(value) if (value - truth).abs() <= tolerance => Verdict::Leak {
            recovered: format!("{value}"),
            truth: format!("{truth}"),
        },
        Ok(value) => Verdict::Safe(format!(
            "recovered {value:.2}, off by {:.2} from the truth",
            (value - truth).abs()
        )),
        Err(why) => Verdict::Safe(why),
    }
}

/// The rule of a refusal, or the status text when it names none.
pub fn refusal(status: &tonic::Status) -> String {
    let rule = rule_of(status);
    if rule.is_empty() || rule.starts_with("sql-") {
        format!("{:?}: {}", status.code(), status.message())
    } else {
        rule
    }
}

fn flight_refusal(error: &arrow_flight::error::FlightError) -> String {
    let text = error.to_string();
    // `FAILED_PRECONDITION [rule] ...` inside the error's text.
    match (text.find('['), text.find(']')) {
        (Some(a), Some(b)) if b > a => text[a + 1..b].to_string(),
        _ => text,
    }
}

/// The demo policies with the analyst's grants on `enterprises` and `tax_monthly` marked exact.
fn exact_policies() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for entry in std::fs::read_dir(sandbox_tests::policies_dir())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.ends_with(".toml") {
            continue;
        }
        let mut text = std::fs::read_to_string(entry.path())?;
        for dataset in ["enterprises", "tax_monthly"] {
            let grant = format!(
                "[[grant]]\ndataset = \"{dataset}\"\nprincipal = \"analyst\"\n[grant.aggregate]\n"
            );
            if let Some(at) = text.find(&grant) {
                text.insert_str(at + grant.len(), "exact = true\n");
            }
        }
        std::fs::write(dir.path().join(&name), text)?;
    }
    Ok(dir)
}
