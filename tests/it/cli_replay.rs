//! `spillway replay`: stored webhooks are delivered again exactly once per
//! replay, the live consumer goes on undisturbed.

use std::collections::HashMap;
use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
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
    ep.history_holds(10).await?;
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
    // Not a terminal: no progress bar, the summary says how fast it went.
    assert!(out.stdout.contains("/s)"), "{}", out.stdout);
    assert!(
        !out.stderr.contains('\r') && !out.stderr.contains("5/5"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("--replay-id "),
        "a generated replay id is shown for resuming: {}",
        out.stderr
    );
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
    assert_eq!(stream_len(&ep.js, &ep.names.history_stream()).await?, 15);

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
    assert_eq!(stream_len(&ep.js, &ep.names.history_stream()).await?, 17);
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
    eventually(
        Duration::from_secs(5),
        "live consumer acked all 17",
        || async {
            ep.consumer_info(&consumer)
                .await
                .is_ok_and(|i| i.ack_floor.stream_sequence == 17)
        },
    )
    .await?;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_says_how_to_resume_and_shows_progress_on_a_terminal() -> Result<()> {
    use async_nats::jetstream::stream;
    let nats = NatsServer::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let ids: Vec<String> = (0..10).map(|i| format!("i{i}")).collect();
    ep.publish_many(&ids).await?;
    ep.history_holds(10).await?;
    let stream_name = ep.names.stream();

    let url = nats.url.clone();
    let run = tokio::spawn(async move {
        spillway(
            &["replay", "default/hooks", "--from-seq", "1", "--rate", "2"],
            &[("NATS_URL", url.as_str())],
        )
        .await
    });
    eventually(Duration::from_secs(10), "two copies", || async {
        stream_len(&ep.js, &stream_name).await.unwrap_or(0) >= 12
    })
    .await?;
    // The stream stops taking the endpoint's subjects: the next copy fails.
    let cfg: stream::Config = ep
        .js
        .get_stream(&stream_name)
        .await?
        .info()
        .await?
        .config
        .clone();
    ep.js
        .update_stream(stream::Config {
            subjects: vec!["elsewhere.>".into()],
            ..cfg.clone()
        })
        .await?;
    let out = run.await??;
    assert!(!out.success, "{}", out.stdout);
    let copied = stream_len(&ep.js, &stream_name).await? - 10;
    assert!((2..10).contains(&copied), "{copied}");
    let resume = out
        .stderr
        .split('`')
        .find(|s| s.starts_with("spillway replay default/hooks --from-seq"))
        .unwrap_or_else(|| panic!("no resume command:\n{}", out.stderr))
        .to_owned();
    assert!(
        resume.contains("--to-seq 10 --replay-id ") && resume.ends_with(" --rate 2"),
        "{resume}"
    );
    assert!(out.stderr.contains("stopped after"), "{}", out.stderr);

    // Back to normal, the printed command finishes the job: every message
    // replayed exactly once in all.
    ep.js.update_stream(cfg).await?;
    let args: Vec<&str> = resume.split_whitespace().skip(1).collect();
    let env = [("NATS_URL", nats.url.as_str())];
    let done = spillway_ok(&args, &env).await?;
    assert!(done.stdout.contains("replayed "), "{}", done.stdout);
    assert_eq!(stream_len(&ep.js, &stream_name).await?, 20);

    // On a terminal (a pty from `script`): a progress bar with count/total
    // and rate. The same replay id again: all ten are duplicates.
    let mut full = args[..8].to_vec();
    full[3] = "1"; // --from-seq 1
    let (ok, screen) = spillway_on_a_terminal(&full, &env).await?;
    assert!(ok, "{screen}");
    assert!(
        screen.contains("/10 (") && screen.contains("/s eta"),
        "count/total and rate: {screen}"
    );
    assert!(screen.contains("10 were already replayed"), "{screen}");
    assert_eq!(stream_len(&ep.js, &stream_name).await?, 20);
    Ok(())
}
