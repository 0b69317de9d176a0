//! The job histogram records every outcome the README lists: a job the guard denies at
//! submission is observed with `outcome="denied"` (it never was: only jobs that reached their
//! end in the background were observed).

use sandbox_proto::v1 as pb;
use sandbox_proto::v1::sandbox_client::SandboxClient;
use tonic::Code;

use crate::{Server, request, sample, scrape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_job_is_observed_as_denied() {
    let server = Server::start(|config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await;
    let address = server.running.metrics_addr.expect("metrics served");
    let denied = "sandbox_job_duration_seconds_count{kind=\"sql\",outcome=\"denied\"}";
    assert_eq!(sample(&scrape(address).await, denied), None);

    let mut client = SandboxClient::new(server.channel().await);
    let bearer = format!("Bearer {}", server.token("analyst"));
    for _ in 0..2 {
        let status = client
            .submit_job(request(
                pb::SubmitJobRequest {
                    spec: Some(pb::JobSpec {
                        kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                            // Raw rows: the guard refuses it before anything runs.
                            query: "SELECT * FROM enterprises".into(),
                            ..Default::default()
                        })),
                    }),
                    label: String::new(),
                },
                Some(&bearer),
                &uuid::Uuid::new_v4().to_string(),
            ))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    }
    let metrics = scrape(address).await;
    assert_eq!(sample(&metrics, denied), Some(2.0), "{metrics}");
    // Observed in the histogram's buckets too, not only its count.
    let bucket = "sandbox_job_duration_seconds_bucket{le=\"+Inf\",kind=\"sql\",outcome=\"denied\"}";
    assert_eq!(sample(&metrics, bucket), Some(2.0), "{metrics}");
    server.stop().await;
}
