//! A burst far larger than the concurrency: the sink never sees more than
//! `concurrency` requests at once, across replicas, and gets every message.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_tests::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_5000_never_exceeds_concurrency_3_and_delivers_all() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    // Slow enough that requests overlap, so the cap is really exercised.
    sink.set_default(Reply::slow(200, Duration::from_millis(2)));
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 3,
            per_replica: 2,
            ..Setup::default()
        },
    )
    .await?;
    let ids: Vec<String> = (0..5000).map(|i| format!("burst-{i}")).collect();
    ep.publish_many(&ids).await?;

    // Two replicas with 2 slots each would like 4 at once; JetStream's
    // maxAckPending (= concurrency 3) holds the global cap.
    let config = ep.config(&sink.url);
    let a = ProcessorProc::start(&config, &nats.url).await?;
    let b = ProcessorProc::start(&config, &nats.url).await?;

    eventually(Duration::from_secs(180), "all 5000 delivered", || async {
        sink.delivered_ids().len() == ids.len()
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: {} of {} delivered, max in flight {}; log a:\n{}",
            sink.delivered_ids().len(),
            ids.len(),
            sink.max_in_flight(),
            a.log_text()
        )
    })?;

    let max = sink.max_in_flight();
    assert!(max <= 3, "the sink saw {max} concurrent requests, cap is 3");
    assert!(
        max >= 2,
        "deliveries never overlapped (max {max}): the test proves nothing"
    );
    let delivered = sink.delivered_ids();
    assert!(ids.iter().all(|id| delivered.contains(id)));

    // Everything is acknowledged: nothing pending, nothing in flight.
    let name = ep.names.consumer(None);
    eventually(Duration::from_secs(10), "consumer drained", || async {
        ep.consumer_info(&name)
            .await
            .map(|i| i.num_pending == 0 && i.num_ack_pending == 0)
            .unwrap_or(false)
    })
    .await?;

    // Both replicas took part, and their metrics add up.
    let acked = "spillway_processor_deliveries_total{outcome=\"acked\",status_class=\"2xx\"}";
    let (ma, mb) = (a.metric(acked).await?, b.metric(acked).await?);
    assert!(ma > 0.0 && mb > 0.0, "a={ma} b={mb}");
    assert!(ma + mb >= 5000.0, "a={ma} b={mb}");
    assert_eq!(a.metric("spillway_processor_in_flight").await?, 0.0);
    println!(
        "burst: 5000 delivered, {} requests, max in flight {max}, replica split {ma}/{mb}",
        sink.count()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_caps_deliveries_per_second() -> Result<()> {
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            rate: Some(10),
            ..Setup::default()
        },
    )
    .await?;
    let ids: Vec<String> = (0..40).map(|i| format!("rate-{i}")).collect();
    ep.publish_many(&ids).await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    eventually(Duration::from_secs(10), "first delivery", || async {
        sink.count() > 0
    })
    .await?;
    eventually(Duration::from_secs(30), "all delivered", || async {
        sink.delivered_ids().len() == ids.len()
    })
    .await?;
    // A burst of at most 10, then 10 per second: the 30 after the burst
    // take at least ~3 s, however fast (or slow) the machine is.
    let mut at: Vec<_> = sink.received().iter().map(|r| r.at).collect();
    at.sort();
    let spread = at[ids.len() - 1].duration_since(at[0]);
    assert!(
        spread >= Duration::from_millis(2500),
        "40 deliveries within {spread:?} at 10/s (burst 10)"
    );
    Ok(())
}

/// The processor runs in-process too (`spillway_processor::run`): it
/// delivers, reports ready, and a graceful shutdown finishes in-flight
/// deliveries before returning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_runs_in_process_and_stops_gracefully() -> Result<()> {
    use spillway_processor::run;
    use spillway_processor::settings::Settings;
    let nats = NatsServer::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let sink = Sink::start().await?;
    sink.script("slow", vec![Reply::slow(200, Duration::from_millis(800))]);
    let settings = Settings::from_config(ep.config(&sink.url))?;
    let running = run::start(settings, nats.client().await?, "127.0.0.1:0".parse()?).await?;
    let admin = running.admin_addr;
    eventually(Duration::from_secs(10), "ready", || async {
        http_get(admin, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200)
    })
    .await?;
    for i in 0..5 {
        ep.publish(&format!("d-{i}"), None, "{}").await?;
    }
    ep.publish("slow", None, "{}").await?;
    eventually(Duration::from_secs(10), "delivered", || async {
        sink.delivered_ids().len() >= 5 && sink.in_flight() == 1
    })
    .await?;
    // The slow one is in flight: shutdown waits for it and acknowledges it.
    running.shutdown(Duration::from_secs(5)).await?;
    assert_eq!(sink.in_flight(), 0);
    let info = ep.consumer_info("processor").await?;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    Ok(())
}
