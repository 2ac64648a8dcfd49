//! The delivery engine against the real nats-server and processor binary:
//! a retry waits off the cap (parked in the retry stream), one pod can use
//! the whole cap, several pods never exceed it together, and a pod killed
//! while a retry waits loses nothing and duplicates nothing.

use std::time::{Duration, Instant};

use crate::processor_support::*;
use anyhow::Result;
use spillway_tests::{NatsServer, eventually};

const LATENCY: Duration = Duration::from_millis(30);

fn ok() -> Reply {
    Reply::slow(200, LATENCY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_first_attempts_do_not_slow_the_drain() -> Result<()> {
    // The scenario at half the size: cap 3, a 30 ms sink, 15 % of
    // first attempts failing (10 % 503, 5 % 429 + Retry-After: 1).
    const N: usize = 1000;
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    sink.set_default(ok());
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 3,
            per_replica: 3,
            backoff: vec!["200ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let ids: Vec<String> = (0..N).map(|i| format!("w{i:04}")).collect();
    let mut failing = 0;
    for (i, id) in ids.iter().enumerate() {
        let first = match i % 20 {
            0 | 7 => Reply::slow(503, LATENCY),
            13 => Reply {
                delay: LATENCY,
                ..Reply::retry_after(429, "1")
            },
            _ => continue,
        };
        failing += 1;
        sink.script(id, vec![first, ok()]);
    }
    ep.publish_many(&ids).await?;
    let config = ep.operator_config(&sink.url, 3)?;
    assert_eq!(
        config.concurrency_per_replica, 3,
        "one pod may use the whole cap"
    );
    let started = Instant::now();
    let p = ProcessorProc::start(&config, &nats.url).await?;
    eventually(Duration::from_secs(90), "all delivered", || async {
        sink.delivered_ids().len() == N
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: {} delivered\n{}",
            sink.delivered_ids().len(),
            p.log_text()
        )
    })?;
    let drain = started.elapsed();
    let calls = sink.count();
    let ideal = LATENCY * calls as u32 / 3;
    let ratio = drain.as_secs_f64() / ideal.as_secs_f64();
    println!(
        "{N} webhooks, {failing} failing first, {calls} sink calls: drained in {drain:?}, ideal {ideal:?}, ratio {ratio:.2}, max in flight {}",
        sink.max_in_flight()
    );
    assert_eq!(
        calls,
        N + failing,
        "each failing webhook called twice, the rest once"
    );
    assert!(
        sink.max_in_flight() <= 3,
        "cap exceeded: {}",
        sink.max_in_flight()
    );
    assert_eq!(sink.max_in_flight(), 3, "the cap was not used");
    assert!(
        ratio <= 1.25,
        "drain {drain:?} is {ratio:.2} x the ideal {ideal:?} (retries held slots?)"
    );
    // Retried copies carried the attempt count and the original headers.
    let w0 = sink.attempts("w0000");
    assert_eq!(w0.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        w0[1]
            .headers
            .get("x-test-event")
            .map(|v| v.to_str().unwrap()),
        Some("ping")
    );
    assert!(p.metric("spillway_processor_retries_moved_total").await? >= failing as f64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_and_backoff_are_honoured_off_the_cap() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 1,
            per_replica: 1,
            backoff: vec!["1s".into(), "2s".into()],
            max_attempts: 3,
            ..Setup::default()
        },
    )
    .await?;
    sink.script(
        "backoff",
        vec![Reply::status(500), Reply::status(502), Reply::status(503)],
    );
    sink.script(
        "later",
        vec![Reply::retry_after(429, "2"), Reply::status(200)],
    );
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    ep.publish("backoff", None, "{}").await?;
    ep.publish("later", None, "{}").await?;
    // Meanwhile, with a cap of 1, other webhooks go through: the waits hold
    // no slot.
    for i in 0..5 {
        ep.publish(&format!("free{i}"), None, "{}").await?;
    }
    eventually(
        Duration::from_secs(3),
        "others delivered during the waits",
        || async { (0..5).all(|i| sink.delivered_ids().contains(&format!("free{i}"))) },
    )
    .await?;
    eventually(
        Duration::from_secs(15),
        "dead-lettered after 3 attempts",
        || async { ep.dead_letters().await.is_ok_and(|d| d.len() == 1) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    eventually(Duration::from_secs(10), "later delivered", || async {
        sink.delivered_ids().contains("later")
    })
    .await?;
    let within = |got: Duration, want: Duration| {
        let (lo, hi) = (want.mul_f64(0.8), want.mul_f64(1.2));
        assert!(
            got >= lo && got <= hi,
            "waited {got:?}, want {want:?} ± 20 %"
        );
    };
    let b = sink.attempts("backoff");
    assert_eq!(b.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    within(b[1].at - b[0].at, Duration::from_secs(1));
    within(b[2].at - b[1].at, Duration::from_secs(2));
    let l = sink.attempts("later");
    within(l[1].at - l[0].at, Duration::from_secs(2));
    let dead = ep.dead_letters().await?;
    assert_eq!(
        header(&dead[0].headers, "Spillway-Dlq-Reason").as_deref(),
        Some("max_attempts")
    );
    assert_eq!(
        header(&dead[0].headers, "Spillway-Dlq-Attempts").as_deref(),
        Some("3")
    );
    assert!(header(&dead[0].headers, "Spillway-Attempts-Spent").is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_burst_gets_the_whole_cap_and_three_pods_never_exceed_it() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    sink.set_default(Reply::slow(200, Duration::from_millis(200)));
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 3,
            ..Setup::default()
        },
    )
    .await?;
    // A burst below the scaling threshold: one pod, as the operator runs it
    // (replicas.max 3), sends 3 at once, not floor(3/3) = 1.
    let config = ep.operator_config(&sink.url, 3)?;
    let mut one = ProcessorProc::start(&config, &nats.url).await?;
    let ids: Vec<String> = (0..9).map(|i| format!("b{i}")).collect();
    ep.publish_many(&ids).await?;
    eventually(Duration::from_secs(10), "burst delivered", || async {
        sink.delivered_ids().len() == 9
    })
    .await?;
    assert_eq!(
        sink.max_in_flight(),
        3,
        "a lone pod used {} of 3 slots",
        sink.max_in_flight()
    );
    one.sigkill();

    // concurrency 5, replicas.max 3, a steady backlog: 5 at once, never 6.
    let sink = Sink::start().await?;
    sink.set_default(Reply::slow(200, Duration::from_millis(50)));
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            name: "five".into(),
            concurrency: 5,
            ..Setup::default()
        },
    )
    .await?;
    let config = ep.operator_config(&sink.url, 3)?;
    assert_eq!(config.concurrency_per_replica, 5);
    let ids: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    ep.publish_many(&ids).await?;
    let mut pods = Vec::new();
    for _ in 0..3 {
        pods.push(ProcessorProc::start(&config, &nats.url).await?);
    }
    eventually(Duration::from_secs(30), "backlog delivered", || async {
        sink.delivered_ids().len() == 300
    })
    .await?;
    assert_eq!(
        sink.max_in_flight(),
        5,
        "three pods with concurrency 5 reached {}",
        sink.max_in_flight()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_while_a_retry_waits_loses_and_duplicates_nothing() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            backoff: vec!["3s".into()],
            ..Setup::default()
        },
    )
    .await?;
    sink.script("k", vec![Reply::status(503), Reply::status(200)]);
    let config = ep.config(&sink.url);
    let mut first = ProcessorProc::start(&config, &nats.url).await?;
    ep.publish("k", None, "{}").await?;
    eventually(Duration::from_secs(5), "parked", || async {
        stream_len(&ep.js, &ep.names.retry_stream())
            .await
            .is_ok_and(|n| n == 1)
    })
    .await?;
    // The original is acknowledged: only the parked copy remains to do.
    let c = ep.consumer_info("processor").await?;
    assert_eq!(c.num_ack_pending, 0, "the waiting retry holds no slot");
    first.sigkill();
    let second = ProcessorProc::start(&config, &nats.url).await?;
    eventually(
        Duration::from_secs(20),
        "delivered after the kill",
        || async { sink.delivered_ids().contains("k") },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", second.log_text()))?;
    // Nothing more arrives: one live copy only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let k = sink.attempts("k");
    assert_eq!(
        k.iter().map(|r| (r.attempt, r.status)).collect::<Vec<_>>(),
        [(1, 503), (2, 200)]
    );
    assert_eq!(stream_len(&ep.js, &ep.names.retry_stream()).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_older_than_max_age_is_dead_lettered_as_expired() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            max_age: "2m".into(),
            ..Setup::default()
        },
    )
    .await?;
    // Accepted 5 minutes ago and never delivered (the processor was down).
    let mut h = ep.gateway_headers("old", None);
    let then = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(300);
    h.insert(
        spillway_api::wire::RECEIVED_AT,
        format!("{then:.3}").as_str(),
    );
    ep.js
        .publish_with_headers(ep.subject_for(None), h, "{}".into())
        .await?
        .await?;
    ep.publish("fresh", None, "{}").await?;
    // As old, but put back on purpose just now (a redrive or replay): its
    // age counts from then.
    let mut h = ep.gateway_headers("redriven", None);
    h.insert(
        spillway_api::wire::RECEIVED_AT,
        format!("{then:.3}").as_str(),
    );
    h.insert(
        spillway_api::wire::REQUEUED_AT,
        format!("{:.3}", jiff::Timestamp::now()).as_str(),
    );
    ep.js
        .publish_with_headers(ep.subject_for(None), h, "{}".into())
        .await?
        .await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    eventually(
        Duration::from_secs(10),
        "expired one dead-lettered",
        || async { ep.dead_letters().await.is_ok_and(|d| d.len() == 1) },
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "fresh and redriven delivered",
        || async {
            let d = sink.delivered_ids();
            d.contains("fresh") && d.contains("redriven")
        },
    )
    .await?;
    let dead = ep.dead_letters().await?;
    assert_eq!(
        header(&dead[0].headers, "Spillway-Delivery-Id").as_deref(),
        Some("old")
    );
    assert_eq!(
        header(&dead[0].headers, "Spillway-Dlq-Reason").as_deref(),
        Some("expired")
    );
    assert!(
        sink.attempts("old").is_empty(),
        "an expired webhook is not delivered"
    );
    Ok(())
}
