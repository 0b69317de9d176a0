//! Flight actions outside Flight SQL: `CloseSession`, which ADBC sends when a connection closes,
//! is answered `CLOSED` and journaled as its caller's call; any other unknown action is refused
//! `INVALID_ARGUMENT` and journaled under its caller too (it used to be answered by the framework,
//! counted under org `none` and journaled without a principal).

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::{Action, Empty};
use futures::TryStreamExt;
use prost::Message;
use sandbox_server::flight::{
    CLOSE_SESSION, CLOSE_SESSION_CLOSED, CloseSessionRequest, CloseSessionResult,
};
use tonic::Code;

use crate::{Server, request, sample, scrape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_session_is_served_and_unknown_actions_are_refused_under_their_caller() {
    let server = Server::start(|config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await;
    let mut flight = FlightServiceClient::new(server.channel().await);
    let bearer = format!("Bearer {}", server.token("analyst"));

    let actions: Vec<String> = flight
        .list_actions(request(Empty {}, Some(&bearer), &new_id()))
        .await
        .expect("listed")
        .into_inner()
        .map_ok(|action| action.r#type)
        .try_collect()
        .await
        .expect("listed");
    assert!(actions.iter().any(|a| a == CLOSE_SESSION), "{actions:?}");

    // What the Go Flight client sends: the plain CloseSessionRequest, no `Any` around it.
    let close_id = new_id();
    let results: Vec<arrow_flight::Result> = flight
        .do_action(request(
            Action::new(CLOSE_SESSION, CloseSessionRequest {}.encode_to_vec()),
            Some(&bearer),
            &close_id,
        ))
        .await
        .expect("CloseSession is served")
        .into_inner()
        .try_collect()
        .await
        .expect("answered");
    assert_eq!(results.len(), 1);
    let result = CloseSessionResult::decode(results[0].body.clone()).expect("a CloseSessionResult");
    assert_eq!(result.status, CLOSE_SESSION_CLOSED);
    let events = server.events_of(&close_id).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        (
            events[0].action.as_str(),
            events[0].principal.as_str(),
            events[0].org.as_str(),
            events[0].decision.as_str()
        ),
        ("FlightSql.CloseSession", "analyst", "analytics", "allow")
    );

    let unknown_id = new_id();
    let status = flight
        .do_action(request(
            Action::new("DropEverything", b"please".to_vec()),
            Some(&bearer),
            &unknown_id,
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("[unknown-action] ")
            && status.message().contains("CloseSession"),
        "{status:?}"
    );
    let events = server.events_of(&unknown_id).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        (
            events[0].action.as_str(),
            events[0].principal.as_str(),
            events[0].decision.as_str(),
            events[0].rule.as_str()
        ),
        ("FlightSql.DoAction", "analyst", "fail", "unknown-action")
    );

    // A CloseSession without credentials is a refusal like any other.
    let refused_id = new_id();
    let status = flight
        .do_action(request(
            Action::new(CLOSE_SESSION, Vec::<u8>::new()),
            None,
            &refused_id,
        ))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let events = server.events_of(&refused_id).await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].decision, "unauthenticated");

    // Counted under the caller's org: one answered, one refused.
    let metrics = scrape(server.running.metrics_addr.expect("metrics served")).await;
    let method = "arrow.flight.protocol.FlightService/DoAction";
    for (org, code, count) in [
        ("analytics", "OK", 1.0),
        ("analytics", "INVALID_ARGUMENT", 1.0),
        ("none", "UNAUTHENTICATED", 1.0),
    ] {
        let key =
            format!("sandbox_requests_total{{method=\"{method}\",org=\"{org}\",code=\"{code}\"}}");
        assert_eq!(sample(&metrics, &key), Some(count), "{key} in:\n{metrics}");
    }
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "sandbox_requests_total{{method=\"{method}\",org=\"none\",code=\"INVALID_ARGUMENT\"}}"
            )
        ),
        None,
        "{metrics}"
    );
    server.stop().await;
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
