//! Load test: starts `sandboxd` as its own process on a fresh demo data dir (loopback, ephemeral
//! port), then runs many concurrent clients for a fixed time, mixing allowed and denied SQL, code
//! jobs, Flight SQL queries, bad tokens, cancelled jobs and abandoned fetches. Prints throughput,
//! p50/p99 latency, counts by status code and rule, and the server's peak RSS; then checks that
//! the audit journal holds exactly one terminal event for every request sent. Exits non-zero on an unexplained
//! status code or an incomplete journal.
//!
//! ```text
//! cargo build --release -p sandbox-server
//! cargo run --release -p sandbox-examples --example load_test -- --seconds 60 --clients 64
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{Any, CommandStatementQuery, ProstMessageExt, TicketStatementQuery};
use arrow_flight::{FlightDescriptor, Ticket};
use prost::Message;
use sandbox_cli::{Client, rule_of};
use sandbox_proto::v1 as pb;
use tonic::Code;

/// Aggregates any analyst may run, with groups above the threshold.
const ALLOWED: [&str; 3] = [
    "SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry",
    "SELECT month, SUM(vat_paid) AS vat FROM tax_monthly GROUP BY month",
    "SELECT e.industry, AVG(t.vat_paid) AS vat FROM tax_monthly t JOIN enterprises e \
     ON t.credit_code = e.credit_code GROUP BY e.industry",
];
/// Refused by the guard: an identifier in the output, a cross join, a hidden column, a join that
/// copies rows (24 months of one enterprise joined to its 24 months).
const DENIED: [&str; 4] = [
    "SELECT credit_code FROM enterprises",
    "SELECT COUNT(*) FROM enterprises a, tax_monthly b",
    "SELECT legal_rep, COUNT(*) FROM enterprises GROUP BY legal_rep",
    "SELECT COUNT(*) AS n FROM tax_monthly a JOIN tax_monthly b ON a.credit_code = b.credit_code",
];
/// Slow enough to be cancelled while it runs: every monthly table joined on its whole row key
/// (the guard refuses joins that multiply rows, so the work is in the joins' size, not in copies).
const SLOW: &str = "SELECT COUNT(*) AS n FROM tax_monthly t \
                    JOIN social_insurance_monthly s \
                    ON t.credit_code = s.credit_code AND t.month = s.month \
                    JOIN housing_fund_monthly h \
                    ON t.credit_code = h.credit_code AND t.month = h.month \
                    JOIN enterprises e ON t.credit_code = e.credit_code";
/// How long an abandoning client waits for a result before it gives up.
const ABANDON_AFTER: Duration = Duration::from_millis(250);
/// The code job's input.
const WASM_INPUT: &str = "SELECT t.credit_code, SUM(t.vat_paid) AS vat, MAX(e.industry) AS industry \
                          FROM tax_monthly t JOIN enterprises e ON t.credit_code = e.credit_code \
                          GROUP BY t.credit_code";
const WASM_COLUMNS: [&str; 4] = [
    "tax_monthly.credit_code",
    "tax_monthly.vat_paid",
    "enterprises.credit_code",
    "enterprises.industry",
];

struct Options {
    seconds: u64,
    clients: usize,
    sandboxd: PathBuf,
    scale: f64,
    /// Extra `sandboxd` flags (limits to try).
    server_args: Vec<String>,
    /// Clients that ignore retry hints and call again at once.
    no_backoff: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        seconds: 60,
        clients: 64,
        sandboxd: default_sandboxd()?,
        scale: 0.05,
        server_args: Vec::new(),
        no_backoff: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("a value is missing");
        match arg.as_str() {
            "--seconds" => options.seconds = value()?.parse()?,
            "--clients" => options.clients = value()?.parse()?,
            "--sandboxd" => options.sandboxd = value()?.into(),
            "--scale" => options.scale = value()?.parse()?,
            "--server-arg" => options.server_args.push(value()?),
            "--no-backoff" => options.no_backoff = true,
            other => anyhow::bail!(
                "unknown argument {other}; usage: load_test [--seconds N] [--clients N] \
                 [--sandboxd PATH] [--scale S] [--server-arg FLAG]... [--no-backoff]"
            ),
        }
    }
    Ok(options)
}

/// `sandboxd` from the same target folder as this example.
fn default_sandboxd() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/load_test -> target/<profile>/sandboxd
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot find the target folder")?;
    Ok(profile_dir.join("sandboxd"))
}

/// One request as the client saw it.
#[derive(Debug, Clone)]
struct Sent {
    request_id: String,
    kind: &'static str,
    /// The principal that sent it, and the job it submitted or fetched.
    principal: &'static str,
    job: Option<String>,
    code: Code,
    rule: String,
    latency: Duration,
}

/// A small deterministic generator per client (no shared state, no extra dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn with_id<T>(client: &Client, message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = client.request(message);
    request.metadata_mut().insert(
        "x-request-id",
        request_id.parse().expect("a UUID is a valid header"),
    );
    request
}

struct Worker {
    principal: &'static str,
    client: Client,
    /// The same principal over Arrow Flight SQL, with its bearer token.
    flight: FlightServiceClient<tonic::transport::Channel>,
    token: String,
    bad: Client,
    module: Option<String>,
    log: Arc<Mutex<Vec<Sent>>>,
    rng: Rng,
    /// The wait the server asked for after the last call.
    backoff: Option<Duration>,
    honor_hints: bool,
}

impl Worker {
    fn record<T>(
        &mut self,
        kind: &'static str,
        request_id: String,
        started: Instant,
        result: &Result<T, tonic::Status>,
    ) {
        self.record_job(kind, request_id, None, started, result);
    }

    fn record_job<T>(
        &mut self,
        kind: &'static str,
        request_id: String,
        job: Option<String>,
        started: Instant,
        result: &Result<T, tonic::Status>,
    ) {
        let (code, rule) = match result {
            Ok(_) => (Code::Ok, String::new()),
            Err(status) => (status.code(), rule_of(status)),
        };
        // A well-behaved client waits as long as the server asks before its next call.
        self.backoff = match result {
            Err(status) => {
                sandbox_cli::retry_after(status).map(|wait| wait.min(Duration::from_secs(1)))
            }
            Ok(_) => None,
        };
        self.log.lock().expect("log lock").push(Sent {
            request_id,
            kind,
            principal: self.principal,
            job,
            code,
            rule,
            latency: started.elapsed(),
        });
    }

    async fn submit(&mut self, kind: &'static str, spec: pb::JobSpec) -> Option<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let request = with_id(
            &self.client,
            pb::SubmitJobRequest {
                spec: Some(spec),
                label: "load".into(),
            },
            &id,
        );
        let result = self.client.sandbox.submit_job(request).await;
        let job = result.as_ref().ok().map(|r| r.get_ref().job_id.clone());
        self.record_job(kind, id, job.clone(), started, &result);
        job
    }

    async fn fetch(&mut self, kind: &'static str, job_id: String, deadline: Option<Duration>) {
        let id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let mut request = with_id(
            &self.client,
            pb::FetchResultRequest {
                job_id: job_id.clone(),
            },
            &id,
        );
        if let Some(deadline) = deadline {
            request.set_timeout(deadline);
        }
        let result = async {
            let mut stream = self
                .client
                .sandbox
                .fetch_result(request)
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await;
        self.record_job(kind, id, Some(job_id), started, &result);
    }

    /// A Flight SQL request with the worker's token and a request id of its own.
    fn flight_request<T>(&self, message: T, request_id: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            metadata.insert("authorization", value);
        }
        if let Ok(value) = request_id.parse() {
            metadata.insert("x-request-id", value);
        }
        request
    }

    /// An allowed query over Flight SQL: `GetFlightInfo` (the job's submission), then `DoGet`
    /// of its ticket (the delivery).
    async fn flight_query(&mut self) {
        let sql = ALLOWED[self.rng.below(ALLOWED.len() as u64) as usize];
        let id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let command = CommandStatementQuery {
            query: sql.into(),
            transaction_id: None,
        };
        let request = self.flight_request(
            FlightDescriptor::new_cmd(command.as_any().encode_to_vec()),
            &id,
        );
        let result = self.flight.get_flight_info(request).await;
        let ticket: Option<Ticket> = result
            .as_ref()
            .ok()
            .and_then(|info| info.get_ref().endpoint.first())
            .and_then(|endpoint| endpoint.ticket.clone());
        // The ticket names the job (for the wait on every admitted job at the end).
        let job = ticket
            .as_ref()
            .and_then(|t| Any::decode(t.ticket.clone()).ok())
            .and_then(|any| any.unpack::<TicketStatementQuery>().ok().flatten())
            .and_then(|t| String::from_utf8(t.statement_handle.to_vec()).ok());
        self.record_job("flight-sql", id, job.clone(), started, &result);
        let Some(ticket) = ticket else { return };
        let id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let request = self.flight_request(ticket, &id);
        let result = async {
            let mut stream = self.flight.do_get(request).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await;
        self.record_job("flight-fetch", id, job, started, &result);
    }

    /// Cancels a job, retrying as the server asks while a limit refuses the call (a job left
    /// running would hold its slot until its time limit).
    async fn cancel(&mut self, job: String) {
        for _ in 0..20 {
            let id = uuid::Uuid::new_v4().to_string();
            let started = Instant::now();
            let request = with_id(
                &self.client,
                pb::CancelJobRequest {
                    job_id: job.clone(),
                },
                &id,
            );
            let result = self.client.sandbox.cancel_job(request).await;
            self.record("cancel", id, started, &result);
            match self.backoff.take() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return,
            }
        }
    }

    async fn one(&mut self) {
        if let Some(wait) = self.backoff.take()
            && self.honor_hints
        {
            tokio::time::sleep(wait).await;
        }
        match self.rng.below(100) {
            0..=34 => {
                let sql = ALLOWED[self.rng.below(ALLOWED.len() as u64) as usize];
                if let Some(job) = self.submit("sql", Client::sql_spec(sql)).await {
                    self.fetch("fetch", job, None).await;
                }
            }
            35..=49 => {
                let sql = DENIED[self.rng.below(DENIED.len() as u64) as usize];
                self.submit("denied-sql", Client::sql_spec(sql)).await;
            }
            50..=59 => {
                let id = uuid::Uuid::new_v4().to_string();
                let started = Instant::now();
                let request = with_id(&self.bad, pb::ListDatasetsRequest {}, &id);
                let result = self.bad.sandbox.list_datasets(request).await;
                self.record("bad-token", id, started, &result);
            }
            60..=64 => {
                // Cancelled while it runs.
                if let Some(job) = self.submit("slow-sql", Client::sql_spec(SLOW)).await {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.cancel(job).await;
                }
            }
            65..=69 => {
                // Abandoned: the client stops waiting, the server cancels the job.
                if let Some(job) = self.submit("slow-sql", Client::sql_spec(SLOW)).await {
                    self.fetch("abandoned-fetch", job.clone(), Some(ABANDON_AFTER))
                        .await;
                    // Refused by a limit, the fetch could not abandon the job: cancel it.
                    if self.backoff.is_some() {
                        self.cancel(job).await;
                    }
                }
            }
            70..=79 => match self.module.clone() {
                Some(sha) => {
                    let spec = Client::wasm_spec(&sha, WASM_INPUT, b"{}");
                    if let Some(job) = self.submit("wasm", spec).await {
                        self.fetch("fetch", job, None).await;
                    }
                }
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    let started = Instant::now();
                    let request = with_id(&self.client, pb::GetBudgetsRequest {}, &id);
                    let result = self.client.sandbox.get_budgets(request).await;
                    self.record("budgets", id, started, &result);
                }
            },
            80..=89 => self.flight_query().await,
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                let started = Instant::now();
                let request = with_id(&self.client, pb::ListDatasetsRequest {}, &id);
                let result = self.client.sandbox.list_datasets(request).await;
                self.record("datasets", id, started, &result);
            }
        }
    }
}

/// The server process, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    addr: String,
    data_dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(
        sandboxd: &Path,
        data_dir: &Path,
        scale: f64,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let mut child = Command::new(sandboxd)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--policies")
            .arg(&policies)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--demo-scale",
                &scale.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {}; build it first with `cargo build [--release] -p \
                     sandbox-server`",
                    sandboxd.display()
                )
            })?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("sandboxd listening on ")
            .with_context(|| format!("unexpected first line from sandboxd: {line:?}"))?
            .to_string();
        Ok(Server {
            child,
            addr: format!("http://{addr}"),
            data_dir: data_dir.to_path_buf(),
        })
    }

    fn token(&self, name: &str) -> anyhow::Result<String> {
        sandbox_examples::demo_token(&self.data_dir, name)
    }

    /// Resident set size now and at its peak, in KiB, from `/proc`.
    fn rss_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// Uploads the code job's module as the bank and has both owners approve it.
async fn approved_module(server: &Server) -> anyhow::Result<String> {
    let scores = sandbox_tests::scores_ipc(&[("91450000000000000X", 700, "A")]);
    let module = sandbox_tests::emitting_guest(&scores, &WASM_COLUMNS, WASM_INPUT);
    let mut bank = Client::connect(&server.addr, &server.token("bank")?).await?;
    let sha = bank.upload_module(module).await?.sha256;
    for owner in ["owner_tax", "owner_market"] {
        Client::connect(&server.addr, &server.token(owner)?)
            .await?
            .approve_module(pb::ApproveModuleRequest {
                sha256: sha.clone(),
                contract_toml: String::new(),
                max_runs: 1_000_000,
                valid_days: 30,
                columns: Vec::new(),
            })
            .await?;
    }
    Ok(sha)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Status codes a request of the mix may legitimately get, with why.
fn explained(sent: &Sent) -> bool {
    match sent.code {
        Code::Ok => true,
        // Ad hoc SQL on L3 data is answered under differential privacy, and a job spends its
        // epsilon when it is admitted (never refunded, so cancelled and abandoned jobs spend too):
        // an analyst's budget may run out during a long run.
        Code::FailedPrecondition
            if sent.rule == "budget-exhausted"
                && matches!(sent.kind, "sql" | "slow-sql" | "flight-sql") =>
        {
            true
        }
        // Policy denials; a hidden column is not even in the catalog (a planning error).
        Code::FailedPrecondition | Code::InvalidArgument => sent.kind == "denied-sql",
        Code::Unauthenticated => sent.kind == "bad-token",
        // Admission and rate limits, time and memory limits.
        Code::ResourceExhausted => true,
        // Cancelled jobs (their fetch or cancel sees the job's state), abandoned fetches.
        Code::Cancelled | Code::DeadlineExceeded => {
            matches!(sent.kind, "cancel" | "abandoned-fetch" | "fetch")
        }
        _ => false,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let dir = tempfile::tempdir()?;
    let server = Server::start(
        &options.sandboxd,
        &dir.path().join("data"),
        options.scale,
        &options.server_args,
    )?;
    println!(
        "sandboxd (pid {}) on {}; {} clients for {} s{}",
        server.child.id(),
        server.addr,
        options.clients,
        options.seconds,
        if options.no_backoff {
            ", ignoring retry hints"
        } else {
            ", each waiting as long as a refusal asks"
        }
    );
    let module = Some(approved_module(&server).await?);
    let log = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let mut rss_samples = Vec::new();

    let mut tasks = Vec::new();
    for index in 0..options.clients {
        let name = if index % 2 == 0 { "analyst" } else { "bank" };
        let token = server.token(name)?;
        let client = Client::connect(&server.addr, &token).await?;
        let bad = Client::connect(&server.addr, &format!("sbx_not_a_token_{index}")).await?;
        let flight = FlightServiceClient::new(
            tonic::transport::Channel::from_shared(server.addr.clone())?
                .connect()
                .await?,
        );
        let mut worker = Worker {
            principal: name,
            client,
            flight,
            token,
            bad,
            // Code jobs are the bank's.
            module: (name == "bank").then(|| module.clone()).flatten(),
            log: log.clone(),
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
            backoff: None,
            honor_hints: !options.no_backoff,
        };
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                worker.one().await;
            }
        }));
    }
    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_samples.push(server.rss_kib().0);
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    let (rss_now, rss_peak) = server.rss_kib();
    let log = std::mem::take(&mut *log.lock().expect("log lock"));

    // Every admitted job ends (and records its end) before the journal is read.
    let mut owners: HashMap<&str, Client> = HashMap::new();
    for name in ["analyst", "bank"] {
        owners.insert(
            name,
            Client::connect(&server.addr, &server.token(name)?).await?,
        );
    }
    let mut job_states: HashMap<String, i32> = HashMap::new();
    for sent in log.iter().filter(|s| s.code == Code::Ok && s.job.is_some()) {
        let job = sent.job.clone().expect("filtered");
        if job_states.contains_key(&job) {
            continue;
        }
        let owner = owners.get_mut(sent.principal).expect("an owner client");
        let waited = Instant::now();
        let state = loop {
            match owner.job_status(&job).await {
                Ok(status) if status.state != pb::JobState::Running as i32 => break status.state,
                Ok(_) if waited.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(status) => break status.state,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(sandbox_cli::retry_after(&status).unwrap_or_default()).await
                }
                Err(status) => anyhow::bail!("job {job}: {status}"),
            }
        };
        job_states.insert(job, state);
    }
    let mut latencies: Vec<Duration> = log.iter().map(|s| s.latency).collect();
    latencies.sort();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for sent in &log {
        let key = if sent.rule.is_empty() {
            format!("{:?}", sent.code)
        } else {
            format!("{:?} [{}]", sent.code, sent.rule)
        };
        *by_code.entry(key).or_default() += 1;
        by_kind.entry(sent.kind).or_default().push(sent.latency);
        if !explained(sent) {
            unexplained.push(sent.clone());
        }
    }
    println!(
        "\n{} requests in {:.1} s: {:.1} requests/s",
        log.len(),
        elapsed.as_secs_f64(),
        log.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency p50 {:.1} ms, p99 {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "\n{:<18} {:>7} {:>10} {:>10}",
        "kind", "count", "p50 ms", "p99 ms"
    );
    for (kind, mut times) in by_kind {
        times.sort();
        println!(
            "{kind:<18} {:>7} {:>10.1} {:>10.1}",
            times.len(),
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3
        );
    }
    println!("\nstatus codes:");
    for (code, count) in &by_code {
        println!("  {code:<48} {count}");
    }
    println!(
        "\nserver RSS: peak {} MiB, at the end {} MiB; every 10 s: {}",
        rss_peak / 1024,
        rss_now / 1024,
        rss_samples
            .iter()
            .step_by(10)
            .map(|kib| format!("{} MiB", kib / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // The journal: exactly one terminal event per request sent (a job's admission record is
    // not terminal).
    let mut auditor = Client::connect(&server.addr, &server.token("auditor")?).await?;
    let mut terminal: HashMap<String, usize> = HashMap::new();
    // Every record up to a fresh checkpoint (the auditor's own reads are journaled too, so
    // "until the end" would move).
    let end = auditor.checkpoint(true).await?.tree_size;
    let mut from = 1;
    while from <= end {
        let page = auditor.events(from, 10_000, false).await?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        for event in &page {
            if event.action != "AdmitJob" {
                *terminal.entry(event.request_id.clone()).or_default() += 1;
            }
        }
    }
    // A client that gives up on a fetch may do so before the request leaves its own queue: then
    // the server never saw it, and the job it would have cancelled ran to its end. A fetch the
    // server saw is journaled, and cancels a running job.
    let (never_arrived, missing): (Vec<&Sent>, Vec<&Sent>) = log
        .iter()
        .filter(|s| !terminal.contains_key(&s.request_id))
        .partition(|s| {
            s.kind == "abandoned-fetch"
                && s.code != Code::Ok
                && s.job
                    .as_ref()
                    .and_then(|j| job_states.get(j))
                    .is_some_and(|state| *state == pb::JobState::Succeeded as i32)
        });
    let duplicated: Vec<&Sent> = log
        .iter()
        .filter(|s| terminal.get(&s.request_id).is_some_and(|n| *n > 1))
        .collect();
    println!(
        "\njournal: {} requests sent, {} with exactly one terminal event, {} missing, {} with \
         more than one; {} abandoned before they reached the server (their jobs ran to the end)",
        log.len(),
        log.len() - missing.len() - duplicated.len() - never_arrived.len(),
        missing.len(),
        duplicated.len(),
        never_arrived.len()
    );
    for sent in missing.iter().chain(&duplicated).take(10) {
        println!("  {sent:?}");
    }
    for sent in unexplained.iter().take(10) {
        println!("unexplained: {sent:?}");
    }
    let alive = server.rss_kib().0 > 0;
    println!("server still running: {alive}");
    drop(server);
    if !unexplained.is_empty() || !missing.is_empty() || !duplicated.is_empty() || !alive {
        anyhow::bail!(
            "{} unexplained status codes, {} requests without and {} with several terminal events",
            unexplained.len(),
            missing.len(),
            duplicated.len()
        );
    }
    println!("OK");
    Ok(())
}
