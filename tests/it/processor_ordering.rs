//! Ordered endpoints: per-key FIFO under retries, other keys keep flowing.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_api::names::partition_of;
use spillway_tests::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_retries_while_other_keys_proceed() -> Result<()> {
    const PARTITIONS: u16 = 4;
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            concurrency: 4,
            per_replica: 2,
            // Long enough for keys b and c to finish meanwhile on a slow
            // machine.
            backoff: vec!["1s".into()],
            max_attempts: 5,
            partitions: Some(PARTITIONS),
            ..Setup::default()
        },
    )
    .await?;
    // Three keys in three different partitions.
    let mut keys: Vec<String> = Vec::new();
    for i in 0.. {
        let k = format!("cus_{i}");
        let p = partition_of(k.as_bytes(), PARTITIONS);
        if keys
            .iter()
            .all(|o| partition_of(o.as_bytes(), PARTITIONS) != p)
        {
            keys.push(k);
        }
        if keys.len() == 3 {
            break;
        }
    }
    let (a, b, c) = (&keys[0], &keys[1], &keys[2]);
    let id = |k: &str, n: usize| format!("{k}-{n}");
    // a-0 fails twice before it succeeds; a-2 once. Everything else is fine.
    sink.script(
        &id(a, 0),
        vec![Reply::status(500), Reply::status(503), Reply::status(200)],
    );
    sink.script(&id(a, 2), vec![Reply::status(500), Reply::status(200)]);
    for n in 0..5 {
        for k in [a, b, c] {
            ep.publish(
                &id(k, n),
                Some(k),
                &format!("{{\"key\":\"{k}\",\"n\":{n}}}"),
            )
            .await?;
        }
    }
    // Two replicas pull the same partition consumers; JetStream's one
    // message in flight per partition keeps each key in order across them.
    let p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    let _p2 = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    eventually(Duration::from_secs(30), "all 15 delivered", || async {
        sink.delivered_ids().len() == 15
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", p.log_text()))?;

    let received = sink.received();
    for k in [a, b, c] {
        let mine: Vec<&Received> = received
            .iter()
            .filter(|r| r.id.starts_with(&format!("{k}-")))
            .collect();
        // Successful deliveries are in publish order, each once.
        let ok: Vec<&str> = mine
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.id.as_str())
            .collect();
        let want: Vec<String> = (0..5).map(|n| id(k, n)).collect();
        assert_eq!(ok, want, "key {k} out of order");
        // No message is attempted before its predecessor succeeded.
        for n in 1..5 {
            let prev_ok = mine
                .iter()
                .find(|r| r.id == id(k, n - 1) && r.status == 200)
                .unwrap()
                .at;
            let first = mine.iter().find(|r| r.id == id(k, n)).unwrap().at;
            assert!(
                first >= prev_ok,
                "{} attempted before {} was delivered",
                id(k, n),
                id(k, n - 1)
            );
        }
    }
    // The failing key held back only itself: b and c were done before a-0
    // was finally delivered.
    let a0_ok = received
        .iter()
        .find(|r| r.id == id(a, 0) && r.status == 200)
        .unwrap()
        .at;
    for k in [b, c] {
        let last = received
            .iter()
            .filter(|r| r.id.starts_with(&format!("{k}-")))
            .map(|r| r.at)
            .max()
            .unwrap();
        assert!(last < a0_ok, "key {k} waited for key {a}");
    }
    assert_eq!(sink.attempts(&id(a, 0)).len(), 3);
    assert!(
        sink.max_in_flight() <= 4,
        "2 replicas x per-replica cap 2, saw {}",
        sink.max_in_flight()
    );
    Ok(())
}
