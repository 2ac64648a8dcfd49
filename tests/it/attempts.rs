//! Attempt records: every delivery attempt is recorded with the answer it
//! got, `spillway attempts` finds them by delivery id, and recording never
//! holds up a delivery.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_api::wire::{AttemptDecision, AttemptRecord};
use spillway_tests::{NatsServer, eventually};

/// The records `spillway attempts` prints for `id` (JSON).
async fn attempts(nats: &NatsServer, id: &str) -> Result<Vec<AttemptRecord>> {
    let out = spillway_ok(
        &["attempts", "default/hooks", "--id", id, "-o", "json"],
        &[("NATS_URL", nats.url.as_str())],
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
    assert_eq!(v["deliveryId"], id, "{v}");
    Ok(serde_json::from_value(v["items"].clone())?)
}

/// Wait until `n` records of `id` are readable (records are written after
/// the delivery, never before it is acknowledged).
async fn wait_records(nats: &NatsServer, id: &str, n: usize) -> Result<Vec<AttemptRecord>> {
    eventually(Duration::from_secs(15), "attempt records", || async {
        attempts(nats, id).await.is_ok_and(|r| r.len() >= n)
    })
    .await?;
    attempts(nats, id).await
}

/// Wait until the history holds `n` webhooks (it copies the work stream
/// through JetStream's flow-controlled sourcing, a moment behind).
async fn wait_history(ep: &Endpoint, n: u64) -> Result<()> {
    eventually(Duration::from_secs(15), "history copies", || async {
        stream_len(&ep.js, &ep.names.history_stream())
            .await
            .is_ok_and(|len| len >= n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_recorded_with_the_answer_it_got() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            max_attempts: 3,
            backoff: vec!["200ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    // A control character and a newline in the answer; and an answer far
    // longer than what a record keeps.
    sink.script(
        "flaky.1",
        vec![
            Reply::body(503, "busy\u{7}\nretry later"),
            Reply::status(200),
        ],
    );
    sink.script("bad", vec![Reply::body(422, &"x".repeat(4096))]);
    let seq = ep.publish("flaky.1", None, "{}").await?;
    ep.publish("bad", None, "{}").await?;

    let flaky = wait_records(&nats, "flaky.1", 2).await?;
    assert_eq!(flaky.len(), 2, "{flaky:#?}");
    assert_eq!(flaky.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(flaky[0].status, Some(503));
    assert_eq!(flaky[0].response.as_deref(), Some("busy  retry later"));
    assert_eq!(flaky[0].decision, AttemptDecision::Retry);
    assert_eq!(flaky[1].status, Some(200));
    assert_eq!(flaky[1].decision, AttemptDecision::Delivered);
    for r in &flaky {
        assert_eq!(r.listener, "processor");
        assert_eq!(r.delivery_id, "flaky.1");
        assert!(!r.pod.is_empty());
        assert!(
            r.started_at.parse::<jiff::Timestamp>().is_ok(),
            "{}",
            r.started_at
        );
    }
    assert!(flaky[0].started_at < flaky[1].started_at);
    // The first attempt's copy is the one published; a retry is a copy the
    // processor put back, stored after it.
    assert_eq!(flaky[0].stream_sequence, seq);
    assert!(flaky[1].stream_sequence > seq);

    let bad = wait_records(&nats, "bad", 1).await?;
    assert_eq!(bad.len(), 1, "{bad:#?}");
    assert_eq!(bad[0].status, Some(422));
    assert_eq!(bad[0].decision, AttemptDecision::Dead);
    assert_eq!(bad[0].response.as_deref().map(str::len), Some(256));

    // An id nobody sent: nothing, said plainly.
    let none = spillway_ok(
        &["attempts", "default/hooks", "--id", "never-sent"],
        &[("NATS_URL", nats.url.as_str())],
    )
    .await?;
    assert!(
        none.stdout
            .starts_with("no attempts recorded for never-sent"),
        "{}",
        none.stdout
    );
    // The table.
    let table = spillway_ok(
        &["attempts", "default/hooks", "--id", "flaky.1"],
        &[("NATS_URL", nats.url.as_str())],
    )
    .await?;
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", table.stdout);
    assert!(
        lines[1].contains("503") && lines[1].contains("retry"),
        "{}",
        table.stdout
    );
    assert!(
        lines[2].contains("200") && lines[2].contains("delivered"),
        "{}",
        table.stdout
    );
    assert!(p.metric("spillway_processor_attempt_records_total").await? >= 3.0);
    spillway_tests::check_metric_labels(&p.metrics().await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_never_holds_up_a_delivery() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let js = nats.jetstream().await?;
    let ep = Endpoint::create(js.clone(), Setup::default()).await?;
    // recordResponseBody: false keeps status and timing only.
    let mut config = ep.config(&sink.url);
    config
        .attempts
        .as_mut()
        .expect("the operator's config records attempts")
        .record_response_body = false;
    let p = ProcessorProc::start(&config, &nats.url).await?;
    sink.script("quiet", vec![Reply::body(200, "account 4711 balance 12")]);
    ep.publish("quiet", None, "{}").await?;
    let quiet = wait_records(&nats, "quiet", 1).await?;
    assert_eq!(quiet[0].status, Some(200));
    assert_eq!(quiet[0].response, None, "{quiet:#?}");

    // Without the attempt stream every record fails, and every webhook is
    // still delivered.
    js.delete_stream(ep.names.attempt_stream()).await?;
    let ids: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
    ep.publish_many(&ids).await?;
    eventually(Duration::from_secs(15), "all delivered", || async {
        let d = sink.delivered_ids();
        ids.iter().all(|id| d.contains(id))
    })
    .await?;
    eventually(Duration::from_secs(15), "lost records counted", || async {
        p.metric("spillway_processor_attempt_records_failed_total{reason=\"publish\"}")
            .await
            .is_ok_and(|v| v >= 20.0)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_sends_one_stored_webhook_again() -> Result<()> {
    let nats = NatsServer::start().await?;
    let env = [("NATS_URL", nats.url.as_str())];
    let sink = Sink::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    for i in 0..5 {
        ep.publish(&format!("other-{i}"), None, "{}").await?;
    }
    ep.publish("r1", None, r#"{"order":42}"#).await?;
    wait_records(&nats, "r1", 1).await?;
    wait_history(&ep, 6).await?;

    let out = spillway_ok(&["redeliver", "default/hooks", "r1"], &env).await?;
    assert!(out.stdout.contains("redelivering r1"), "{}", out.stdout);
    eventually(Duration::from_secs(15), "r1 delivered again", || async {
        sink.attempts("r1").len() == 2
    })
    .await?;
    let got = sink.attempts("r1");
    assert_eq!(got[1].body, got[0].body);
    // The new request is an attempt like any other, numbered afresh.
    let records = wait_records(&nats, "r1", 2).await?;
    assert_eq!(
        records
            .iter()
            .map(|r| (r.attempt, r.decision))
            .collect::<Vec<_>>(),
        [
            (1, AttemptDecision::Delivered),
            (1, AttemptDecision::Delivered)
        ]
    );
    // One request per command: nothing else was sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.attempts("r1").len(), 2);
    assert_eq!(sink.attempts("other-0").len(), 1);

    let missing = spillway(
        &["redeliver", "default/hooks", "nope", "--since", "1h"],
        &env,
    )
    .await?;
    assert!(!missing.success);
    assert!(
        missing.stderr.contains("nope is not in the history"),
        "{}",
        missing.stderr
    );
    let listener = spillway(
        &["redeliver", "default/hooks", "r1", "--listener", "ci"],
        &env,
    )
    .await?;
    assert!(!listener.success);
    assert!(
        listener.stderr.contains("listener \"ci\" not found"),
        "{}",
        listener.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_list_stored_webhooks_with_their_state() -> Result<()> {
    let nats = NatsServer::start().await?;
    let env = [("NATS_URL", nats.url.as_str())];
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            max_attempts: 3,
            backoff: vec!["30s".into()],
            ..Setup::default()
        },
    )
    .await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    sink.script("bad", vec![Reply::status(422)]);
    sink.script("later", vec![Reply::status(503)]);
    // A GitHub push, with its signature header as the gateway stores it.
    let mut h = ep.gateway_headers("push-1", None);
    h.insert("Spillway-Orig-X-Github-Event", "push");
    h.insert("Spillway-Orig-X-Hub-Signature-256", "sha256=0123abcd");
    ep.js
        .publish_with_headers(ep.names.subject(0), h, r#"{"ref":"main"}"#.into())
        .await?
        .await?;
    for id in ["bad", "later"] {
        ep.publish(id, None, r#"{"type":"invoice.paid"}"#).await?;
    }
    for id in ["push-1", "bad", "later"] {
        wait_records(&nats, id, 1).await?;
    }
    wait_history(&ep, 3).await?;

    let list = spillway_ok(&["events", "default/hooks", "-o", "json"], &env).await?;
    let v: serde_json::Value = serde_json::from_str(&list.stdout)?;
    let items = v["items"].as_array().expect("items");
    let row = |id: &str| {
        items
            .iter()
            .find(|i| i["deliveryId"] == id)
            .unwrap_or_else(|| panic!("{id} not listed: {v}"))
            .clone()
    };
    assert_eq!(items.len(), 3, "{v}");
    assert_eq!(row("push-1")["eventType"], "push");
    assert_eq!(row("push-1")["listeners"][0]["state"], "delivered");
    assert_eq!(row("bad")["eventType"], "invoice.paid");
    assert_eq!(row("bad")["listeners"][0]["state"], "dead");
    assert_eq!(row("bad")["listeners"][0]["lastStatus"], 422);
    assert_eq!(row("later")["listeners"][0]["state"], "failed");

    let dead = spillway_ok(&["events", "default/hooks", "--state", "dead"], &env).await?;
    let lines: Vec<&str> = dead.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", dead.stdout);
    assert!(
        lines[1].contains("bad") && lines[1].contains("processor=dead(1)"),
        "{}",
        dead.stdout
    );

    let shown = spillway_ok(&["events", "show", "default/hooks", "push-1"], &env).await?;
    let text = &shown.stdout;
    assert!(text.contains("Event type:   push"), "{text}");
    assert!(
        text.contains("Spillway-Orig-X-Hub-Signature-256: <redacted>"),
        "{text}"
    );
    assert!(!text.contains("0123abcd"), "{text}");
    assert!(
        text.contains("--body prints it") && !text.contains("\"ref\""),
        "{text}"
    );
    assert!(text.contains("delivered"), "{text}");
    let with_body = spillway_ok(
        &["events", "show", "default/hooks", "push-1", "--body"],
        &env,
    )
    .await?;
    assert!(
        with_body.stdout.contains(r#"{"ref":"main"}"#),
        "{}",
        with_body.stdout
    );
    Ok(())
}

/// Benchmark (ignored; docs/benchmarks/attempts.md): look up one delivery
/// id's attempts with `spillway attempts` among a million stored records.
///
/// ```sh
/// cargo build -p spillway-cli
/// SPILLWAY_BENCH_RECORDS=1000000 cargo test -p spillway-tests --test it \
///   attempts::lookup_among_a_million_records -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run on purpose, see docs/benchmarks/attempts.md"]
async fn lookup_among_a_million_records() -> Result<()> {
    use std::time::Instant;

    use futures::StreamExt as _;
    use spillway_api::names::EndpointNames;
    use spillway_api::wire::AttemptDecision;

    let records: u64 = std::env::var("SPILLWAY_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await?;
    let names = EndpointNames::new("default", "hooks");
    // The operator's stream, with room for every record.
    let spec: spillway_api::WebhookEndpointSpec = serde_json::from_value(serde_json::json!({
        "verification": {"scheme": "none"},
        "processor": {"sink": {"url": "http://sink.invalid/"}},
        "stream": {"attemptsMaxBytes": -1},
    }))?;
    let t = spillway_api::validate::check(&spec).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    js.create_stream(spillway_operator::jetstream::attempts_config(
        &names, &spec, &t,
    ))
    .await?;

    // One record per delivery id, three listeners, as a processor writes
    // them; 256 publishes awaiting their acknowledgement at a time.
    let started = Instant::now();
    let record = |i: u64| AttemptRecord {
        delivery_id: format!("provider:github:{i:08x}-cc78-11e3-81ab-4c9367dc0958"),
        received_at: Some("2026-12-05T10:00:00.001Z".into()),
        listener: ["processor", "ci", "bot"][(i % 3) as usize].into(),
        attempt: 1,
        stream_sequence: i + 1,
        started_at: "2026-12-05T10:00:00.123Z".into(),
        duration_ms: 12,
        status: Some(200),
        error: None,
        response: Some("ok".into()),
        decision: AttemptDecision::Delivered,
        pod: "hooks-processor-7d9f8c6b5-x2x4q".into(),
    };
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..records {
        let r = record(i);
        let payload = serde_json::to_vec(&r)?;
        let ack = js
            .publish(
                names.attempt_subject(&r.listener, &r.delivery_id),
                payload.into(),
            )
            .await?;
        acks.push(ack.into_future());
        while acks.len() >= 256 {
            acks.next().await.expect("pending")?;
        }
    }
    while let Some(a) = acks.next().await {
        a?;
    }
    let fill = started.elapsed();
    let mut stream = js.get_stream(names.attempt_stream()).await?;
    let stored = stream.info().await?.state.clone();
    assert_eq!(stored.messages, records);

    // Look up ids at the start, middle and end, each with the real CLI
    // (a process: start, connect, look up, print).
    let env = [("NATS_URL", nats.url.as_str())];
    let mut timings = Vec::new();
    for i in [0, records / 2, records - 1, records / 3, records * 2 / 3] {
        let id = record(i).delivery_id;
        let t0 = Instant::now();
        let out = spillway_ok(
            &["attempts", "default/hooks", "--id", &id, "-o", "json"],
            &env,
        )
        .await?;
        timings.push(t0.elapsed());
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        assert_eq!(v["items"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(v["items"][0]["deliveryId"], id.as_str());
    }
    timings.sort();
    println!(
        "| records | stored MiB | fill | lookups (5, `spillway attempts` process, sorted) |\n|---:|---:|---:|---|\n| {records} | {:.0} | {:.1} s | {} |",
        stored.bytes as f64 / 1048576.0,
        fill.as_secs_f64(),
        timings
            .iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let worst = *timings.last().expect("five lookups");
    assert!(
        worst < Duration::from_millis(200),
        "a lookup took {worst:?} among {records} records (target < 200 ms)"
    );
    Ok(())
}
