//! Crash safety: the real `sandboxd` is killed with SIGKILL at random moments while concurrent
//! SQL jobs run, 30 times, restarting each time. Afterwards the journal verifies (framing, chain,
//! dense sequence numbers, every signed checkpoint), and every result a client received has its
//! durable terminal record with the same digest at the sequence number the client was told.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_proto::v1 as pb;
use sandbox_proto::v1::sandbox_client::SandboxClient;
use tonic::transport::Channel;

const KILLS: usize = 30;
const CLIENTS: usize = 4;
const QUERIES: [&str; 3] = [
    "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class",
    "SELECT month, SUM(vat_paid) AS vat FROM tax_monthly GROUP BY month",
    "SELECT industry, COUNT(DISTINCT credit_code) AS n FROM enterprises GROUP BY industry",
];

/// What a client was told about one released result.
#[derive(Debug, Clone)]
struct Received {
    job_id: String,
    audit_seq: u64,
    sha256: String,
}

/// Starts `sandboxd` on an ephemeral loopback port and waits for its address. With
/// `max_file_bytes`, no file of the process may grow beyond that size (`ulimit -f`, with
/// SIGXFSZ ignored so a write past it fails with EFBIG): a disk that is full for the journal.
fn start(data_dir: &Path, max_file_bytes: Option<u64>) -> (Child, String) {
    let binary = env!("CARGO_BIN_EXE_sandboxd");
    let mut command = match max_file_bytes {
        None => Command::new(binary),
        Some(bytes) => {
            let mut shell = Command::new("sh");
            shell
                .arg("-c")
                .arg(r#"trap '' XFSZ; ulimit -f "$0" && exec "$@""#)
                .arg((bytes / 512).to_string())
                .arg(binary);
            shell
        }
    };
    let mut child = command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--demo-scale")
        .arg("0.02")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sandboxd starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("sandboxd printed its address before exiting")
            .expect("stdout line");
        if let Some(addr) = line.strip_prefix("sandboxd listening on ") {
            break addr.trim().to_string();
        }
    };
    (child, addr)
}

/// A small deterministic generator; the seed is printed so a failing run can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The clients' runtime: two workers, like the machine.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The demo analyst's token, as the server wrote it at first start.
fn analyst_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("credentials/analyst.token"))
        .expect("token")
        .trim()
        .to_string()
}

/// A client of a server that is up.
async fn connect(addr: &str) -> SandboxClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    SandboxClient::new(channel)
}

fn authorized<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// Submits and fetches jobs until the server goes away, recording every complete result.
async fn workload(addr: String, token: String, worker: usize, received: Arc<Mutex<Vec<Received>>>) {
    let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
    else {
        return;
    };
    let mut client = SandboxClient::new(channel);
    let request = |message| authorized(message, &token);
    let fetch = |message| authorized(message, &token);
    for round in 0.. {
        let query = QUERIES[(worker + round) % QUERIES.len()].to_string();
        let spec = pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                query,
                ..Default::default()
            })),
        };
        let Ok(submitted) = client
            .submit_job(request(pb::SubmitJobRequest {
                spec: Some(spec),
                label: String::new(),
            }))
            .await
        else {
            return;
        };
        let job_id = submitted.into_inner().job_id;
        let Ok(stream) = client
            .fetch_result(fetch(pb::FetchResultRequest {
                job_id: job_id.clone(),
            }))
            .await
        else {
            return;
        };
        let mut stream = stream.into_inner();
        let mut ipc = Vec::new();
        let mut summary = None;
        loop {
            match stream.message().await {
                Ok(Some(message)) => match message.part {
                    Some(pb::fetch_result_response::Part::ArrowIpc(bytes)) => {
                        ipc.extend_from_slice(&bytes)
                    }
                    Some(pb::fetch_result_response::Part::Summary(s)) => summary = Some(s),
                    None => {}
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
        let Some(summary) = summary else { return };
        let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &ipc));
        assert_eq!(
            sha256, summary.result_sha256,
            "the bytes are the ones recorded"
        );
        received.lock().expect("lock").push(Received {
            job_id,
            audit_seq: summary.audit_seq,
            sha256,
        });
    }
}

#[test]
fn sigkill_during_concurrent_jobs_never_loses_a_delivered_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut random = XorShift(seed);
    let runtime = runtime();
    let received = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    for kill in 0..KILLS {
        let (mut child, addr) = start(&data_dir, None);
        let token = analyst_token(&data_dir);
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|worker| {
                runtime.spawn(workload(
                    addr.clone(),
                    token.clone(),
                    worker,
                    received.clone(),
                ))
            })
            .collect();
        // Between 20 and 600 ms of work, then SIGKILL: no shutdown, no final checkpoint.
        std::thread::sleep(Duration::from_millis(20 + random.next() % 580));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        for task in tasks {
            runtime
                .block_on(task)
                .expect("a client task ends, never panics");
        }
        eprintln!(
            "kill {}: {} results received so far",
            kill + 1,
            received.lock().expect("lock").len()
        );
    }
    eprintln!("{KILLS} kills in {:.1}s", started.elapsed().as_secs_f64());

    // The journal as the last crash left it: repaired at open like a start would, then closed.
    let audit = data_dir.join("audit");
    let events = {
        let (journal, _) = sandbox_audit::Journal::open(&audit).expect("the journal opens");
        journal.read(1, 100_000_000).expect("events")
    };
    let report = sandbox_audit::verify_bundle(&audit, None, true)
        .expect("readable")
        .expect("the journal and every checkpoint verify");
    assert_eq!(report.records, events.len() as u64);
    for (i, stored) in events.iter().enumerate() {
        assert_eq!(stored.event.seq, i as u64 + 1, "sequence numbers are dense");
    }
    let starts = events.iter().filter(|e| e.event.action == "Start").count();
    assert_eq!(starts, KILLS, "every start is recorded");
    let repaired = events
        .iter()
        .filter(|e| e.event.action == "Start" && !e.event.message.contains("repaired 0 torn"))
        .count();
    let admitted_only = events
        .iter()
        .filter(|e| e.event.action == "AdmitJob")
        .filter(|a| {
            !events
                .iter()
                .any(|e| e.event.action == "SubmitJob" && e.event.job_id == a.event.job_id)
        })
        .count();
    eprintln!(
        "{repaired} starts repaired a torn tail; {admitted_only} jobs were admitted but cut off \
         before their terminal record"
    );

    let received = received.lock().expect("lock").clone();
    assert!(
        received.len() >= KILLS,
        "the workload delivered too little to mean anything: {}",
        received.len()
    );
    for result in &received {
        let event = &events
            .get(result.audit_seq as usize - 1)
            .unwrap_or_else(|| panic!("no record {} for job {}", result.audit_seq, result.job_id))
            .event;
        assert_eq!(event.job_id, result.job_id, "record {}", result.audit_seq);
        assert_eq!(event.action, "SubmitJob");
        assert_eq!(event.decision, sandbox_audit::Decision::Allow);
        assert_eq!(event.result_sha256, result.sha256);
        let admitted = events
            .iter()
            .any(|e| e.event.action == "AdmitJob" && e.event.job_id == result.job_id);
        assert!(admitted, "job {} was admitted before it ran", result.job_id);
    }
}

/// One SQL job, submitted and fetched: its receipt, or the status that refused it.
async fn one_job(addr: &str, token: &str) -> Result<Received, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = SandboxClient::new(channel);
    let spec = pb::JobSpec {
        kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
            query: QUERIES[0].to_string(),
            ..Default::default()
        })),
    };
    let job_id = client
        .submit_job(authorized(
            pb::SubmitJobRequest {
                spec: Some(spec),
                label: String::new(),
            },
            token,
        ))
        .await?
        .into_inner()
        .job_id;
    let mut stream = client
        .fetch_result(authorized(
            pb::FetchResultRequest {
                job_id: job_id.clone(),
            },
            token,
        ))
        .await?
        .into_inner();
    let mut ipc = Vec::new();
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(pb::fetch_result_response::Part::ArrowIpc(bytes)) => ipc.extend_from_slice(&bytes),
            Some(pb::fetch_result_response::Part::Summary(summary)) => {
                return Ok(Received {
                    job_id,
                    audit_seq: summary.audit_seq,
                    sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &ipc)),
                });
            }
            None => {}
        }
    }
    Err(tonic::Status::data_loss(
        "the result ended without its summary",
    ))
}

#[test]
fn a_full_disk_stops_releases_with_a_clear_error_and_corrupts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let runtime = runtime();
    // A first start creates the demo; its journal is the baseline.
    let (mut child, _) = start(&data_dir, None);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let journal = data_dir.join("audit").join(sandbox_audit::JOURNAL_FILE);
    let baseline = std::fs::metadata(&journal).expect("journal").len();
    let token = analyst_token(&data_dir);

    // Room for the start and a few jobs, then the disk is full for the journal.
    let (mut child, addr) = start(&data_dir, Some(baseline + 24 * 1024));
    let mut released = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..200 {
        match runtime.block_on(one_job(&addr, &token)) {
            Ok(received) => {
                assert!(refusals.is_empty(), "released after the journal stopped");
                released.push(received);
            }
            Err(status) => {
                refusals.push(status);
                if refusals.len() == 3 {
                    break;
                }
            }
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    assert!(!released.is_empty(), "some jobs ran before the disk filled");
    assert_eq!(refusals.len(), 3, "the disk never filled");
    for status in &refusals {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("audit journal cannot record"),
            "{status:?}"
        );
    }

    // On a disk with room again the journal opens (a partial last write is a torn tail, cut),
    // verifies whole, and holds every released result.
    let audit = data_dir.join("audit");
    let events = {
        let (journal, report) = sandbox_audit::Journal::open(&audit).expect("opens");
        eprintln!("reopened after the full disk: {report:?}");
        journal.read(1, 100_000_000).expect("events")
    };
    sandbox_audit::verify_bundle(&audit, None, true)
        .expect("readable")
        .expect("verifies");
    for result in &released {
        let event = &events[result.audit_seq as usize - 1].event;
        assert_eq!(event.job_id, result.job_id);
        assert_eq!(event.result_sha256, result.sha256);
    }
    let (mut child, addr) = start(&data_dir, None);
    runtime
        .block_on(one_job(&addr, &token))
        .expect("the restarted server releases again");
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

/// A query under differential privacy that is admitted (its debit durable) and then cut off by
/// SIGKILL, before or while it runs and before its answer is fetched, stays paid: the budget
/// rebuilt from the journal at the next start counts every admitted query.
#[test]
fn sigkill_between_a_dp_debit_and_its_delivery_never_refunds() {
    const ROUNDS: usize = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let runtime = runtime();
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut admitted = 0u64;
    for round in 0..ROUNDS {
        let (mut child, addr) = start(&data_dir, None);
        let token = analyst_token(&data_dir);
        let submitted = runtime.block_on(async {
            let mut client = connect(&addr).await;
            // Another alias each round: a new question, never answered from the cache.
            let spec = pb::JobSpec {
                kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                    query: format!(
                        "SELECT case_type, AVG(amount) AS amount_{round} FROM court_cases \
                         GROUP BY case_type"
                    ),
                    ..Default::default()
                })),
            };
            client
                .submit_job(authorized(
                    pb::SubmitJobRequest {
                        spec: Some(spec),
                        label: String::new(),
                    },
                    &token,
                ))
                .await
                .is_ok()
        });
        assert!(submitted, "round {round}: the DP query is admitted");
        admitted += 1;
        // Killed 0 to 30 ms after admission: while it runs, or after it ended but before the
        // answer was fetched.
        std::thread::sleep(Duration::from_millis(random.next() % 30));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
    let (mut child, addr) = start(&data_dir, None);
    let token = analyst_token(&data_dir);
    let budgets = runtime.block_on(async {
        connect(&addr)
            .await
            .get_budgets(authorized(pb::GetBudgetsRequest {}, &token))
            .await
            .expect("budgets")
            .into_inner()
            .budgets
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let court = budgets
        .iter()
        .find(|b| b.dataset == "court_cases")
        .expect("the court budget");
    assert_eq!(
        court.queries, admitted,
        "every admitted query stays debited"
    );
    assert!(
        (court.epsilon_spent - admitted as f64).abs() < 1e-3 * admitted as f64,
        "epsilon spent {} for {admitted} queries of epsilon (at most) 1",
        court.epsilon_spent
    );
}
