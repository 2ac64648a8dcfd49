//! `spillway replay`: stored webhooks are delivered again exactly once per
//! replay, the live consumer goes on undisturbed.

#[path = "../src/processor_support.rs"]
mod processor_support;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use processor_support::*;
use spillway_tests::{NatsServer, eventually};

fn counts(sink: &Sink) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in sink
        .received()
        .into_iter()
        .filter(|r| r.answered && r.status == 200)
    {
        *m.entry(r.id).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_delivers_the_range_again_exactly_once() -> Result<()> {
    let nats = NatsServer::start().await?;
    let env = [("NATS_URL", nats.url.as_str())];
    let sink = Sink::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    let ids: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    ep.publish_many(&ids).await?; // sequences 1..=10
    eventually(Duration::from_secs(10), "first delivery", || async {
        sink.delivered_ids().len() == 10
    })
    .await?;
    let consumer = ep.names.consumer(None);
    let before = ep.consumer_info(&consumer).await?;

    // Sequences 3..=7 are r2..=r6.
    let out = spillway_ok(
        &[
            "replay",
            "default/hooks",
            "--from-seq",
            "3",
            "--to-seq",
            "7",
        ],
        &env,
    )
    .await?;
    assert!(out.stdout.contains("replayed 5 "), "{}", out.stdout);
    eventually(
        Duration::from_secs(10),
        "replayed copies delivered",
        || async { sink.count() >= 15 },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = counts(&sink);
    for (i, id) in ids.iter().enumerate() {
        let want = if (2..=6).contains(&i) { 2 } else { 1 };
        assert_eq!(c.get(id).copied(), Some(want), "{id}: {c:?}");
    }
    assert_eq!(stream_len(&ep.js, &ep.names.stream()).await?, 15);

    // --since with an end, repeated with the same replay id: once only.
    let args = [
        "replay",
        "default/hooks",
        "--since",
        "1h",
        "--to-seq",
        "2",
        "--replay-id",
        "fixed",
    ];
    let out = spillway_ok(&args, &env).await?;
    assert!(out.stdout.contains("replayed 2 "), "{}", out.stdout);
    let again = spillway_ok(&args, &env).await?;
    assert!(again.stdout.contains("replayed 0 "), "{}", again.stdout);
    assert!(
        again.stdout.contains("2 were already replayed"),
        "{}",
        again.stdout
    );
    assert_eq!(stream_len(&ep.js, &ep.names.stream()).await?, 17);
    eventually(Duration::from_secs(10), "r0 and r1 again", || async {
        let c = counts(&sink);
        c.get("r0") == Some(&2) && c.get("r1") == Some(&2)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 17, "one delivery per stored copy");

    // The live consumer was not reconfigured and simply went on.
    let after = ep.consumer_info(&consumer).await?;
    assert_eq!(after.config.max_ack_pending, before.config.max_ack_pending);
    assert_eq!(after.config.durable_name, before.config.durable_name);
    assert_eq!(after.ack_floor.stream_sequence, 17);

    // Errors say what to do.
    let bad = spillway(&["replay", "default/hooks", "--from-seq", "99"], &env).await?;
    assert!(
        !bad.success && bad.stderr.contains("after the last stored sequence"),
        "{}",
        bad.stderr
    );
    let missing = spillway(&["replay", "default/nope", "--since", "1h"], &env).await?;
    assert!(
        !missing.success && missing.stderr.contains("not found"),
        "{}",
        missing.stderr
    );
    Ok(())
}
