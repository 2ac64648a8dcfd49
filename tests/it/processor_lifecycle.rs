//! Crashes, graceful shutdown and pause: nothing is lost.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_tests::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_delivery_loses_nothing() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    sink.set_default(Reply::slow(200, Duration::from_millis(20)));
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 4,
            per_replica: 4,
            timeout: "2s".into(),
            backoff: vec!["300ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let ids: Vec<String> = (0..300).map(|i| format!("crash-{i}")).collect();
    ep.publish_many(&ids).await?;
    let config = ep.config(&sink.url);
    let mut first = ProcessorProc::start(&config, &nats.url).await?;
    eventually(
        Duration::from_secs(20),
        "some delivered and some in flight",
        || async { sink.delivered_ids().len() >= 50 && sink.in_flight() > 0 },
    )
    .await?;
    first.sigkill();
    let at_kill = sink.delivered_ids().len();
    assert!(at_kill < ids.len(), "killed too late to prove anything");

    let second = ProcessorProc::start(&config, &nats.url).await?;
    eventually(
        Duration::from_secs(60),
        "all delivered after the crash",
        || async { sink.delivered_ids().len() == ids.len() },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: {} of {}\n{}",
            sink.delivered_ids().len(),
            ids.len(),
            second.log_text()
        )
    })?;
    let delivered = sink.delivered_ids();
    assert!(ids.iter().all(|id| delivered.contains(id)));
    let cut_off = sink.received().iter().filter(|r| !r.answered).count();
    println!(
        "sigkill: {at_kill} delivered before the kill, {cut_off} requests cut off, all 300 delivered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_stops_pulling() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    // Slow enough that SIGTERM lands while the first three are in flight.
    sink.set_default(Reply::slow(200, Duration::from_secs(2)));
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let ids: Vec<String> = (0..10).map(|i| format!("term-{i}")).collect();
    ep.publish_many(&ids).await?;
    let config = ep.config(&sink.url);
    let mut p = ProcessorProc::start(&config, &nats.url).await?;
    eventually(Duration::from_secs(10), "3 in flight", || async {
        sink.in_flight() == 3
    })
    .await?;
    p.sigterm().await?;
    let status = p.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "exit status {status:?}\n{}", p.log_text());

    // The three in flight were finished, nothing new was started.
    assert_eq!(sink.count(), 3, "pulled after SIGTERM");
    assert_eq!(
        sink.delivered_ids().len(),
        3,
        "in-flight deliveries were not finished"
    );
    let info = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert_eq!(
        info.ack_floor.stream_sequence, 3,
        "the finished three are acknowledged"
    );
    assert_eq!(info.num_pending + info.num_ack_pending as u64, 7);

    // A new processor picks up the rest.
    sink.set_default(Reply::status(200));
    let _p2 = ProcessorProc::start(&config, &nats.url).await?;
    eventually(Duration::from_secs(20), "the rest delivered", || async {
        sink.delivered_ids().len() == 10
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_does_not_pull_and_resumes_where_it_left_off() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            paused: true,
            ..Setup::default()
        },
    )
    .await?;
    ep.publish("a", None, "{}").await?;
    let first = ep.config(&sink.url);
    let mut p = ProcessorProc::start(&first, &nats.url).await?; // ready while paused
    ep.publish("b", None, "{}").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(sink.count(), 0, "delivered while paused");
    let info = ep.consumer_info(&ep.names.consumer(None)).await?;
    assert_eq!((info.num_pending, info.num_ack_pending), (2, 0));
    p.sigterm().await?;
    assert!(p.wait_exit(Duration::from_secs(10)).await?.success());

    // Resumed (the operator rolls the pods with paused=false).
    let mut resumed = first.clone();
    resumed.paused = false;
    let _p = ProcessorProc::start(&resumed, &nats.url).await?;
    eventually(Duration::from_secs(10), "both delivered", || async {
        sink.delivered_ids().len() == 2
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_its_consumers_and_survives_a_nats_restart() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let setup = Setup::default();
    // Started before the operator created anything: alive, not ready.
    let names = spillway_api::names::EndpointNames::new(&setup.namespace, &setup.name);
    let config = {
        let ep = Endpoint {
            setup: setup.clone(),
            names,
            js: nats.jetstream().await?,
        };
        ep.config(&sink.url)
    };
    let p = ProcessorProc::spawn(&config, &nats.url)?;
    let admin = p.admin;
    eventually(Duration::from_secs(10), "healthz up", || async move {
        matches!(http_get(admin, "/healthz").await, Ok((200, _)))
    })
    .await?;
    assert_eq!(http_get(admin, "/readyz").await?.0, 503);

    let ep = Endpoint::create(nats.jetstream().await?, setup).await?;
    p.wait_ready().await?;
    for i in 0..5 {
        ep.publish(&format!("before-{i}"), None, "{}").await?;
    }
    eventually(
        Duration::from_secs(10),
        "delivered before restart",
        || async { sink.delivered_ids().len() == 5 },
    )
    .await?;

    nats.restart().await?;
    let js = nats.jetstream().await?;
    let ep = Endpoint { js, ..ep };
    for i in 0..5 {
        ep.publish(&format!("after-{i}"), None, "{}").await?;
    }
    eventually(
        Duration::from_secs(30),
        "delivered after restart",
        || async { sink.delivered_ids().len() == 10 },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;
    eventually(Duration::from_secs(10), "ready again", || async move {
        matches!(http_get(admin, "/readyz").await, Ok((200, _)))
    })
    .await?;
    Ok(())
}
