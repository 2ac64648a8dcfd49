//! Dead letters: 4xx at once, 410 with a clear signal, exhausted attempts;
//! the dead letter carries the original and the failure; the original is
//! not delivered again.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_api::wire;
use spillway_tests::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_gone_and_exhausted_attempts_are_dead_lettered() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            max_attempts: 3,
            backoff: vec!["100ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    sink.script("bad", vec![Reply::status(400)]);
    sink.script("gone", vec![Reply::status(410)]);
    sink.script("flaky", vec![Reply::status(500); 10]);
    sink.script(
        "late",
        vec![Reply::status(500), Reply::status(500), Reply::status(200)],
    );
    let bad_seq = ep.publish("bad", None, r#"{"kind":"bad"}"#).await?;
    ep.publish("gone", None, r#"{"kind":"gone"}"#).await?;
    ep.publish("flaky", None, r#"{"kind":"flaky"}"#).await?;
    ep.publish("late", None, r#"{"kind":"late"}"#).await?;

    eventually(Duration::from_secs(20), "three dead letters", || async {
        ep.dead_letters()
            .await
            .map(|d| d.len() == 3)
            .unwrap_or(false)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    eventually(Duration::from_secs(10), "late delivered", || async {
        sink.delivered_ids().contains("late")
    })
    .await?;
    // Give any wrong redelivery the time to show up.
    tokio::time::sleep(Duration::from_millis(600)).await;

    assert_eq!(sink.attempts("bad").len(), 1, "400 is not retried");
    assert_eq!(sink.attempts("gone").len(), 1, "410 is not retried");
    assert_eq!(sink.attempts("flaky").len(), 3, "maxAttempts 3");
    assert_eq!(
        sink.attempts("late").len(),
        3,
        "succeeded on the last attempt"
    );

    let dl = ep.dead_letters().await?;
    let find = |id: &str| {
        dl.iter()
            .find(|m| {
                spillway_tests::stored_webhook(m)
                    .is_ok_and(|(w, _)| w.delivery_id.as_deref() == Some(id))
            })
            .unwrap_or_else(|| panic!("no dead letter for {id}"))
            .clone()
    };
    let bad = find("bad");
    // The dead letter keeps the stored payload (format 2) as it was.
    let (stored, body) = spillway_tests::stored_webhook(&bad)?;
    assert_eq!(stored.format, Some(spillway_api::stored::Format::V2));
    assert_eq!(body, br#"{"kind":"bad"}"#);
    assert_eq!(
        header(&bad.headers, wire::DLQ_REASON).as_deref(),
        Some("client_error")
    );
    assert_eq!(
        header(&bad.headers, wire::DLQ_ATTEMPTS).as_deref(),
        Some("1")
    );
    assert_eq!(
        header(&bad.headers, wire::DLQ_LAST_STATUS).as_deref(),
        Some("400")
    );
    assert_eq!(
        header(&bad.headers, wire::DLQ_ORIGINAL_SEQ),
        Some(bad_seq.to_string())
    );
    assert_eq!(
        header(&bad.headers, wire::DLQ_ORIGINAL_SUBJECT),
        Some(ep.names.subject(0))
    );
    assert_eq!(stored.content_type.as_deref(), Some("application/json"));
    assert_eq!(stored.header("X-Test-Event"), Some("ping"));
    assert!(
        header(&bad.headers, wire::DLQ_DETAIL)
            .unwrap()
            .contains("400")
    );
    assert!(header(&bad.headers, wire::DLQ_FAILED_AT).is_some());

    let gone = find("gone");
    assert_eq!(
        header(&gone.headers, wire::DLQ_REASON).as_deref(),
        Some("gone")
    );
    assert_eq!(
        header(&gone.headers, wire::DLQ_LAST_STATUS).as_deref(),
        Some("410")
    );

    let flaky = find("flaky");
    assert_eq!(
        header(&flaky.headers, wire::DLQ_REASON).as_deref(),
        Some("max_attempts")
    );
    assert_eq!(
        header(&flaky.headers, wire::DLQ_ATTEMPTS).as_deref(),
        Some("3")
    );
    assert_eq!(
        header(&flaky.headers, wire::DLQ_LAST_STATUS).as_deref(),
        Some("500")
    );

    // Originals are settled: nothing pending or in flight.
    let info = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));

    assert_eq!(p.metric("spillway_processor_sink_gone_total").await?, 1.0);
    assert_eq!(
        p.metric("spillway_processor_dead_lettered_total{reason=\"client_error\"}")
            .await?,
        1.0
    );
    assert_eq!(
        p.metric("spillway_processor_dead_lettered_total{reason=\"max_attempts\"}")
            .await?,
        1.0
    );
    assert!(
        p.log_text().contains("410 Gone"),
        "the log says the sink is gone"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dead_letter_publish_keeps_the_message() -> Result<()> {
    // No dead-letter stream at first: the publish fails, the message must
    // stay (retried), and land in the dead-letter stream once it exists.
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let js = nats.jetstream().await?;
    let ep = Endpoint::create(
        js.clone(),
        Setup {
            // The operator's consumer: JetStream does not stop redelivering
            // after maxAttempts (with max_deliver = 1 it would drop this
            // message after the failed dead-letter publish).
            max_attempts: 1,
            backoff: vec!["200ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    js.delete_stream(ep.names.dead_letter_stream()).await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    sink.set_default(Reply::status(400));
    ep.publish("keep", None, "{\"keep\":true}").await?;
    held_after_a_failed_dead_letter(&p, &ep).await?;

    js.create_stream(async_nats::jetstream::stream::Config {
        name: ep.names.dead_letter_stream(),
        subjects: vec![ep.names.dead_letter_subject()],
        ..Default::default()
    })
    .await?;
    eventually(
        Duration::from_secs(10),
        "dead letter after recovery",
        || async {
            ep.dead_letters()
                .await
                .map(|d| d.len() == 1)
                .unwrap_or(false)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    let d = &ep.dead_letters().await?[0];
    assert_eq!(spillway_tests::stored_webhook(d)?.1, b"{\"keep\":true}");
    eventually(Duration::from_secs(5), "original settled", || async {
        ep.consumer_info(&ep.names.consumer(None))
            .await
            .map(|i| i.num_ack_pending == 0 && i.num_pending == 0)
            .unwrap_or(false)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dead_letters_disabled_a_failure_is_dropped_and_counted() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            dead_letter: false,
            ..Setup::default()
        },
    )
    .await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    sink.script("no", vec![Reply::status(400)]);
    ep.publish("no", None, "{}").await?;
    ep.publish("yes", None, "{}").await?;
    eventually(Duration::from_secs(10), "dropped", || async {
        p.metric("spillway_processor_dropped_total")
            .await
            .unwrap_or(0.0)
            == 1.0
    })
    .await?;
    eventually(Duration::from_secs(10), "settled", || async {
        ep.consumer_info(&ep.names.consumer(None))
            .await
            .map(|i| i.num_pending == 0 && i.num_ack_pending == 0)
            .unwrap_or(false)
    })
    .await?;
    assert_eq!(sink.attempts("no").len(), 1);
    assert!(sink.delivered_ids().contains("yes"));
    assert!(ep.dead_letters().await?.is_empty());
    Ok(())
}

/// A dead letter's id names the stored message, not just its sequence: the
/// message at the same sequence of a recreated work stream is a new dead
/// letter, not a "duplicate" that is silently terminated (it was lost when
/// ids were `dlq-<stream>-<seq>`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_gets_new_dead_letter_ids() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let js = nats.jetstream().await?;
    let setup = Setup {
        max_attempts: 1,
        ..Setup::default()
    };
    let ep = Endpoint::create(js.clone(), setup.clone()).await?;
    sink.set_default(Reply::status(400));
    let mut p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    assert_eq!(ep.publish("first", None, "{\"n\":1}").await?, 1);
    eventually(Duration::from_secs(10), "first dead letter", || async {
        ep.dead_letters().await.is_ok_and(|d| d.len() == 1)
    })
    .await?;
    p.sigkill();

    // The work stream deleted and made again (its sequences restart).
    js.delete_stream(ep.names.stream()).await?;
    js.delete_stream(ep.names.history_stream()).await?;
    let ep = Endpoint::create(js.clone(), setup).await?;
    assert_eq!(ep.publish("second", None, "{\"n\":2}").await?, 1);
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    eventually(Duration::from_secs(10), "second dead letter", || async {
        ep.dead_letters().await.is_ok_and(|d| d.len() == 2)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    let ids: Vec<String> = ep
        .dead_letters()
        .await?
        .iter()
        .filter_map(|m| spillway_tests::stored_webhook(m).ok()?.0.delivery_id)
        .collect();
    assert_eq!(ids, ["first", "second"]);
    Ok(())
}

/// A dead-letter publish answered "duplicate" counts only if the
/// dead-letter stream still holds that message: otherwise the original is
/// kept (and retried), never terminated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_answer_for_a_dead_letter_not_held_keeps_the_original() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let js = nats.jetstream().await?;
    let ep = Endpoint::create(
        js.clone(),
        Setup {
            max_attempts: 1,
            backoff: vec!["200ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let seq = ep.publish("keep", None, "{\"keep\":true}").await?;
    // The dead-letter stream has seen this message's dead-letter id (its
    // window remembers it) but no longer holds it.
    let stored = js
        .get_stream(ep.names.stream())
        .await?
        .get_raw_message(seq)
        .await?;
    let id = wire::dead_letter_msg_id(&ep.names.stream(), seq, stored.time.unix_timestamp_nanos());
    let mut h = async_nats::HeaderMap::new();
    h.insert(wire::NATS_MSG_ID, id.as_str());
    let decoy = js
        .publish_with_headers(ep.names.dead_letter_subject(), h, "decoy".into())
        .await?
        .await?;
    js.get_stream(ep.names.dead_letter_stream())
        .await?
        .delete_message(decoy.sequence)
        .await?;

    sink.set_default(Reply::status(400));
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    // The duplicate answer is refused like a failed publish.
    held_after_a_failed_dead_letter(&p, &ep).await?;
    assert!(ep.dead_letters().await?.is_empty());
    Ok(())
}

/// Wait until the processor counts a failed dead-letter publish, then
/// check the original is still held by its consumer (not terminated).
async fn held_after_a_failed_dead_letter(p: &ProcessorProc, ep: &Endpoint) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        "a failed dead-letter publish",
        || async {
            p.metric("spillway_processor_dead_letter_publish_failures_total")
                .await
                .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    let info = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert_eq!(
        info.num_ack_pending as u64 + info.num_pending,
        1,
        "the message is still held"
    );
    Ok(())
}

/// A webhook stored in format 1 (by a gateway of an earlier release) and
/// one in format 2 reach the sink alike; a payload that starts as format 2
/// and does not parse is dead-lettered as `malformed`, never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_stored_formats_reach_the_sink_alike_and_a_malformed_one_is_dead_lettered()
-> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    let body = r#"{"n":1}"#;
    ep.js
        .publish_with_headers(
            ep.subject_for(None),
            ep.gateway_headers("v1", None),
            body.into(),
        )
        .await?
        .await?;
    ep.publish("v2", None, body).await?;
    let mut h = async_nats::HeaderMap::new();
    h.insert(wire::NATS_MSG_ID, "broken");
    let broken: &[u8] = b"SPILLWAY/2\r\nSpillway-Delivery-Id broken\r\n\r\n{}";
    ep.js
        .publish_with_headers(ep.subject_for(None), h, broken.to_vec().into())
        .await?
        .await?;
    eventually(
        Duration::from_secs(15),
        "both delivered, one dead letter",
        || async {
            sink.delivered_ids().len() == 2 && ep.dead_letters().await.is_ok_and(|d| d.len() == 1)
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    let (v1, v2) = (&sink.attempts("v1")[0], &sink.attempts("v2")[0]);
    assert_eq!(v1.body.as_ref(), body.as_bytes());
    assert_eq!(
        v2.body.as_ref(),
        body.as_bytes(),
        "the body alone, no stored head"
    );
    let names = |r: &Received| {
        let mut n: Vec<String> = r.headers.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    };
    assert_eq!(names(v1), names(v2));
    for same in ["content-type", "x-test-event", "spillway-attempt"] {
        assert_eq!(v1.headers.get(same), v2.headers.get(same), "{same}");
    }
    assert_eq!(v2.headers["spillway-delivery-id"], "v2");
    assert!(v2.headers.contains_key("spillway-received-at"));
    let dl = &ep.dead_letters().await?[0];
    assert_eq!(
        header(&dl.headers, wire::DLQ_REASON).as_deref(),
        Some("malformed")
    );
    assert!(
        header(&dl.headers, wire::DLQ_DETAIL).is_some_and(|d| d.contains("malformed")),
        "{:?}",
        dl.headers
    );
    assert_eq!(dl.payload.as_ref(), broken, "kept as it was stored");
    assert_eq!(sink.count(), 2, "the malformed one was never delivered");
    Ok(())
}
