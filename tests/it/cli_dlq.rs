//! `spillway dlq list|redrive` against a real nats-server, processor and
//! sink: each dead letter is delivered again exactly once.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_api::wire;
use spillway_tests::{NatsServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_redrive_deliver_each_dead_letter_exactly_once() -> Result<()> {
    let nats = NatsServer::start().await?;
    let env = [("NATS_URL", nats.url.as_str())];
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            max_attempts: 2,
            backoff: vec!["100ms".into()],
            ..Setup::default()
        },
    )
    .await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;
    let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
    for id in &ids {
        sink.script(id, vec![Reply::status(422)]);
        ep.publish(id, None, &format!("{{\"id\":\"{id}\"}}"))
            .await?;
    }
    ep.publish("fine", None, "{}").await?;
    eventually(Duration::from_secs(15), "five dead letters", || async {
        ep.dead_letters()
            .await
            .map(|d| d.len() == 5)
            .unwrap_or(false)
    })
    .await?;

    let list = spillway_ok(&["dlq", "list", "default/hooks"], &env).await?;
    for id in &ids {
        assert!(
            list.stdout.contains(id.as_str()),
            "{id} not listed:\n{}",
            list.stdout
        );
    }
    assert_eq!(
        list.stdout.matches("client_error").count(),
        5,
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("422"));

    // The same for scripts.
    let list = spillway_ok(&["dlq", "list", "default/hooks", "-o", "json"], &env).await?;
    let v: serde_json::Value = serde_json::from_str(&list.stdout)?;
    assert_eq!(v["endpoint"], "default/hooks");
    assert_eq!(v["total"], 5);
    let items = v["items"].as_array().expect("items");
    let mut listed: Vec<&str> = items
        .iter()
        .map(|i| i["deliveryId"].as_str().unwrap_or_default())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    for i in items {
        assert_eq!(i["reason"], "client_error", "{i}");
        assert_eq!(i["lastStatus"], 422, "{i}");
        assert_eq!(i["attempts"], 1, "{i}");
        assert_eq!(i["originalSubject"], ep.names.subject(0).as_str(), "{i}");
        assert!(i["seq"].as_u64().is_some_and(|s| s > 0), "{i}");
        let age = i["ageSeconds"].as_i64().expect("ageSeconds");
        assert!((0..60).contains(&age), "{i}");
        assert_eq!(i["age"], format!("{age}s"));
        assert!(
            i["deadLetteredAt"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z')),
            "{i}"
        );
    }
    let list = spillway_ok(
        &["dlq", "list", "default/hooks", "--limit", "2", "-o", "json"],
        &env,
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&list.stdout)?;
    assert_eq!(
        (v["total"].as_u64(), v["items"].as_array().map(Vec::len)),
        (Some(5), Some(2))
    );
    // --seq takes what `seq` says.
    let d1_seq = items
        .iter()
        .find(|i| i["deliveryId"] == "d1")
        .and_then(|i| i["seq"].as_u64())
        .expect("d1 listed");

    // Two by id, then the rest.
    let out = spillway_ok(
        &[
            "dlq",
            "redrive",
            "default/hooks",
            "--seq",
            &d1_seq.to_string(),
            "--id",
            "d3",
        ],
        &env,
    )
    .await?;
    assert!(out.stdout.contains("redrove 2"), "{}", out.stdout);
    assert_eq!(ep.dead_letters().await?.len(), 3);
    let out = spillway_ok(
        &["dlq", "redrive", "default/hooks", "--all", "--rate", "50"],
        &env,
    )
    .await?;
    assert!(out.stdout.contains("redrove 3"), "{}", out.stdout);
    // Not a terminal: no progress bar, the summary says how fast it went.
    assert!(out.stdout.contains("/s)"), "{}", out.stdout);
    assert!(
        !out.stderr.contains('\r') && !out.stderr.contains("3/3"),
        "{}",
        out.stderr
    );
    eventually(
        Duration::from_secs(15),
        "all redriven delivered",
        || async {
            let d = sink.delivered_ids();
            ids.iter().all(|i| d.contains(i))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        let a = sink.attempts(id);
        assert_eq!(
            a.iter().map(|r| r.status).collect::<Vec<_>>(),
            [422, 200],
            "{id}: one failure, then exactly one redelivery"
        );
        // A redriven message starts a new round of attempts.
        assert_eq!(a[1].attempt, 1);
        assert_eq!(
            a[1].body.as_ref(),
            format!("{{\"id\":\"{id}\"}}").as_bytes()
        );
    }
    assert!(ep.dead_letters().await?.is_empty());
    // A redrive is not a new webhook: it goes to the listener's due
    // subject, and the history keeps each webhook once.
    assert_eq!(stream_len(&ep.js, &ep.names.history_stream()).await?, 6);

    // Nothing left: a second redrive does nothing; unknown ids are errors.
    let out = spillway_ok(&["dlq", "redrive", "default/hooks", "--all"], &env).await?;
    assert!(out.stdout.contains("redrove 0") || out.stderr.contains("no dead letters"));
    assert_eq!(stream_len(&ep.js, &ep.names.history_stream()).await?, 6);
    let list = spillway_ok(&["dlq", "list", "default/hooks"], &env).await?;
    assert!(list.stdout.contains("no dead letters"), "{}", list.stdout);
    let list = spillway_ok(&["dlq", "list", "default/hooks", "-o", "yaml"], &env).await?;
    let v: serde_json::Value = serde_saphyr::from_str(&list.stdout)?;
    assert_eq!(
        (v["total"].as_u64(), v["items"].as_array().map(Vec::len)),
        (Some(0), Some(0))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_redrive_run_again_does_not_duplicate() -> Result<()> {
    let nats = NatsServer::start().await?;
    let env = [("NATS_URL", nats.url.as_str())];
    let js = nats.jetstream().await?;
    let ep = Endpoint::create(js.clone(), Setup::default()).await?;
    // Two dead letters as the processor writes them.
    let mut seqs = Vec::new();
    for id in ["x1", "x2"] {
        let mut h = ep.gateway_headers(id, None);
        h.insert(wire::NATS_MSG_ID, format!("dlq-{id}").as_str());
        h.insert(wire::DLQ_REASON, "max_attempts");
        h.insert(wire::DLQ_ORIGINAL_SUBJECT, ep.names.subject(0).as_str());
        let ack = js
            .publish_with_headers(ep.names.dead_letter_subject(), h, "{}".into())
            .await?
            .await?;
        seqs.push(ack.sequence);
    }
    // A previous run published x1 back, then died before deleting it.
    let mut h = ep.gateway_headers("x1", None);
    h.insert(
        wire::NATS_MSG_ID,
        wire::redrive_msg_id(&ep.names.dead_letter_stream(), seqs[0]).as_str(),
    );
    js.publish_with_headers(ep.names.subject(0), h, "{}".into())
        .await?
        .await?;
    assert_eq!(stream_len(&js, &ep.names.stream()).await?, 1);

    let out = spillway_ok(&["dlq", "redrive", "default/hooks", "--all"], &env).await?;
    assert!(out.stdout.contains("redrove 1"), "{}", out.stdout);
    assert!(out.stdout.contains("1 already redriven"), "{}", out.stdout);
    assert_eq!(
        stream_len(&js, &ep.names.stream()).await?,
        2,
        "x1 once, x2 once"
    );
    assert!(ep.dead_letters().await?.is_empty());

    let bad = spillway(&["dlq", "redrive", "default/hooks", "--id", "nope"], &env).await?;
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("nope") && bad.stderr.contains("not found"),
        "{}",
        bad.stderr
    );

    // On a terminal: a progress bar with count/total and rate on stderr.
    for id in ["y1", "y2"] {
        let mut h = ep.gateway_headers(id, None);
        h.insert(wire::NATS_MSG_ID, format!("dlq-{id}").as_str());
        h.insert(wire::DLQ_ORIGINAL_SUBJECT, ep.names.subject(0).as_str());
        js.publish_with_headers(ep.names.dead_letter_subject(), h, "{}".into())
            .await?
            .await?;
    }
    let (ok, screen) =
        spillway_on_a_terminal(&["dlq", "redrive", "default/hooks", "--all"], &env).await?;
    assert!(ok, "{screen}");
    assert!(
        screen.contains("redriven [") && screen.contains("/2 (") && screen.contains("/s eta"),
        "{screen}"
    );
    assert!(screen.contains("redrove 2 dead letters"), "{screen}");
    assert!(ep.dead_letters().await?.is_empty());
    Ok(())
}
