//! Credential refusals: each says what was wrong and what fixes it, and the journal records
//! what the caller presented (a token's hash prefix, never the token), not an empty principal.

use sandbox_proto::v1 as pb;
use sandbox_proto::v1::sandbox_client::SandboxClient;
use tonic::Code;

use crate::{Server, request};

fn hash_prefix(token: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ))[..12]
        .to_string()
}

fn basic(user: &str, token: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    format!("Basic {encoded}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_journaled_by_its_hash_prefix_and_told_what_was_wrong() {
    let server = Server::start(|_| {}).await;
    let mut client = SandboxClient::new(server.channel().await);
    let forged = format!("sbx_{}", uuid::Uuid::new_v4().simple());
    let analyst = server.token("analyst");
    // (authorization, rule, the message after the rule, what the journal names)
    let cases = [
        (
            Some(format!("Bearer {forged}")),
            "unknown-token",
            "the bearer token is not known to this server: check --as/--token-file (tokens are \
             under <data-dir>/credentials/)"
                .to_string(),
            format!("token:{}", hash_prefix(&forged)),
        ),
        // Flight SQL's login: the bank's name with the analyst's token.
        (
            Some(basic("bank", &analyst)),
            "credential-mismatch",
            "the user name `bank` is not the principal of its password's token (`analyst`): log \
             in as the token's principal, or with the user's own token"
                .to_string(),
            format!("token:{}", hash_prefix(&analyst)),
        ),
        (
            None,
            "missing-credentials",
            "no credentials: send a bearer token (`authorization: Bearer <token>`; the CLI's --as \
             NAME or --token-file F) or, over TLS, a client certificate"
                .to_string(),
            String::new(),
        ),
    ];
    for (authorization, rule, message, presented) in cases {
        let request_id = uuid::Uuid::new_v4().to_string();
        let status = client
            .list_datasets(request(
                pb::ListDatasetsRequest {},
                authorization.as_deref(),
                &request_id,
            ))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(
            status.message(),
            format!("[{rule}] {message} (request {request_id})")
        );
        assert_eq!(
            status
                .metadata()
                .get("x-sandbox-rule")
                .and_then(|v| v.to_str().ok()),
            Some(rule)
        );
        let events = server.events_of(&request_id).await;
        assert_eq!(events.len(), 1, "{events:#?}");
        let event = &events[0];
        assert_eq!(event.action, "ListDatasets");
        assert_eq!(event.decision, "unauthenticated");
        assert_eq!(event.rule, rule);
        assert_eq!(event.principal, presented, "{event:#?}");
        assert_eq!(event.org, "");
        assert_eq!(event.message, message);
        // The secret itself is nowhere in the record.
        let recorded = format!("{event:?}");
        assert!(!recorded.contains(&forged) && !recorded.contains(&analyst));
    }
    server.stop().await;
}
