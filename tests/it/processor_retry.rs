//! Retries: server errors and timeouts follow the backoff schedule,
//! Retry-After is honoured, long deliveries are kept alive.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_tests::{NatsServer, eventually};

async fn start(setup: Setup) -> Result<(NatsServer, Sink, Endpoint, ProcessorProc)> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, setup).await?;
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    Ok((nats, sink, ep, p))
}

fn gaps(rs: &[Received]) -> Vec<Duration> {
    rs.windows(2).map(|w| w[1].at - w[0].at).collect()
}

async fn wait_delivered(sink: &Sink, p: &ProcessorProc, id: &str) -> Result<()> {
    eventually(Duration::from_secs(20), id, || async {
        sink.delivered_ids().contains(id)
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: attempts {:?}\n{}",
            sink.attempts(id).len(),
            p.log_text()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_timeouts_are_retried_on_the_backoff_schedule() -> Result<()> {
    let (_nats, sink, ep, p) = start(Setup {
        timeout: "1s".into(),
        backoff: vec!["300ms".into(), "2s".into()],
        max_attempts: 5,
        ..Setup::default()
    })
    .await?;
    sink.script(
        "e5xx",
        vec![Reply::status(500), Reply::status(502), Reply::status(200)],
    );
    sink.script(
        "slow",
        vec![
            Reply::slow(200, Duration::from_millis(1600)),
            Reply::status(200),
        ],
    );
    ep.publish("e5xx", None, r#"{"n":1}"#).await?;
    ep.publish("slow", None, r#"{"n":2}"#).await?;
    wait_delivered(&sink, &p, "e5xx").await?;
    wait_delivered(&sink, &p, "slow").await?;

    let e = sink.attempts("e5xx");
    assert_eq!(e.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(
        e.iter().map(|r| r.status).collect::<Vec<_>>(),
        [500, 502, 200]
    );
    let g = gaps(&e);
    assert!(
        g[0] >= Duration::from_millis(280),
        "first retry after {:?}, backoff 300ms",
        g[0]
    );
    assert!(
        g[1] >= Duration::from_millis(1980),
        "second retry after {:?}, backoff 2s",
        g[1]
    );
    // Not stretched either: with a JetStream consumer backoff as well, the
    // server adds backoff[n] - backoff[0] to a delayed NAK (2s became 3.7s).
    let c = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert!(c.config.backoff.is_empty(), "{:?}", c.config.backoff);
    assert!(
        g[1] < Duration::from_millis(3500),
        "second retry after {:?}, backoff 2s (stretched?)",
        g[1]
    );
    // The body arrives unchanged on every attempt.
    assert!(e.iter().all(|r| r.body.as_ref() == br#"{"n":1}"#));

    // The slow one timed out once (1s) and was retried.
    let s = sink.attempts("slow");
    assert_eq!(s.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(
        gaps(&s)[0] >= Duration::from_millis(1280),
        "timeout + backoff, got {:?}",
        gaps(&s)[0]
    );

    let name = ep.names.consumer(None);
    eventually(Duration::from_secs(5), "acked", || async {
        ep.consumer_info(&name)
            .await
            .map(|i| i.num_ack_pending == 0 && i.num_pending == 0)
            .unwrap_or(false)
    })
    .await?;
    assert_eq!(p.metric("spillway_processor_retries_total").await?, 3.0);
    assert_eq!(
        p.metric(
            "spillway_processor_deliveries_total{outcome=\"retried\",status_class=\"timeout\"}"
        )
        .await?,
        1.0
    );
    assert!(ep.dead_letters().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_for_429_and_503() -> Result<()> {
    let (_nats, sink, ep, p) = start(Setup {
        backoff: vec!["100ms".into()],
        ..Setup::default()
    })
    .await?;
    sink.script(
        "r429",
        vec![Reply::retry_after(429, "2"), Reply::status(200)],
    );
    sink.script(
        "r503",
        vec![Reply::retry_after(503, "1"), Reply::status(204)],
    );
    ep.publish("r429", None, "{}").await?;
    ep.publish("r503", None, "{}").await?;
    wait_delivered(&sink, &p, "r429").await?;
    wait_delivered(&sink, &p, "r503").await?;
    let g429 = gaps(&sink.attempts("r429"));
    let g503 = gaps(&sink.attempts("r503"));
    assert_eq!((g429.len(), g503.len()), (1, 1));
    assert!(
        g429[0] >= Duration::from_millis(1950),
        "429 Retry-After 2 retried after {:?}",
        g429[0]
    );
    assert!(
        g503[0] >= Duration::from_millis(950),
        "503 Retry-After 1 retried after {:?}",
        g503[0]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_deliveries_are_kept_alive_and_not_redelivered_meanwhile() -> Result<()> {
    // JetStream would redeliver after 1s; the sink takes 3s; the
    // processor's in-progress acks keep the message with its one attempt.
    let (_nats, sink, ep, p) = start(Setup {
        timeout: "5s".into(),
        backoff: vec!["300ms".into()],
        ack_wait: Some(Duration::from_secs(1)),
        ..Setup::default()
    })
    .await?;
    sink.script("long", vec![Reply::slow(200, Duration::from_secs(3))]);
    ep.publish("long", None, "{}").await?;
    wait_delivered(&sink, &p, "long").await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let a = sink.attempts("long");
    assert_eq!(
        a.len(),
        1,
        "redelivered while in progress: attempts {:?}",
        a.iter().map(|r| r.attempt).collect::<Vec<_>>()
    );
    let info = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.num_ack_pending, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_are_retried_until_the_sink_is_up() -> Result<()> {
    let nats = NatsServer::start().await?;
    let port = spillway_tests::free_port();
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            backoff: vec!["200ms".into()],
            max_attempts: 20,
            ..Setup::default()
        },
    )
    .await?;
    let p = ProcessorProc::start(
        &ep.config(&format!("http://127.0.0.1:{port}/hook")),
        &nats.url,
    )
    .await?;
    ep.publish("down", None, "{}").await?;
    let refused = "spillway_processor_deliveries_total{outcome=\"retried\",status_class=\"error\"}";
    eventually(
        Duration::from_secs(10),
        "connection errors retried",
        || async { p.metric(refused).await.unwrap_or(0.0) >= 2.0 },
    )
    .await?;
    let sink = Sink::start_on(port).await?;
    wait_delivered(&sink, &p, "down").await?;
    let a = sink.attempts("down");
    assert_eq!(a.len(), 1);
    assert!(
        a[0].attempt >= 3,
        "attempt {} after two refused ones",
        a[0].attempt
    );
    assert!(ep.dead_letters().await?.is_empty());
    Ok(())
}
