//! Per-namespace NATS users (issue 15.11): with the permissions
//! `spillway nats-permissions` prints (`spillway_api::tenancy`), a
//! namespace's processors deliver, retry and dead-letter their own
//! webhooks, and cannot read another namespace's streams.

use std::ffi::OsStr;
use std::time::Duration;

use crate::processor_support::*;
use anyhow::{Context, Result};
use async_nats::jetstream;
use spillway_api::tenancy::processor_permissions;
use spillway_tests::{NatsServer, eventually};

fn user(name: &str, password: &str, namespace: &str) -> String {
    let perms = processor_permissions(namespace, &["gh".into()]).to_server_config();
    format!("{{ user: {name:?}, password: {password:?}, {perms} }}")
}

async fn connect(url: &str, user: &str, password: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(url)
        .await
        .with_context(|| format!("connecting as {user}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_user_reads_only_its_namespace() -> Result<()> {
    let nats = NatsServer::start_with(&format!(
        "authorization {{ users: [\n{{ user: admin, password: admin }}\n{}\n{}\n] }}",
        user("team-a", "pa", "team-a"),
        user("team-b", "pb", "team-b"),
    ))
    .await?;
    let admin = jetstream::new(connect(&nats.url, "admin", "admin").await?);
    let setup = |ns: &str| Setup {
        namespace: ns.into(),
        name: "gh".into(),
        max_attempts: 2,
        backoff: vec!["100ms".into()],
        ..Setup::default()
    };
    let a = Endpoint::create(admin.clone(), setup("team-a")).await?;
    let b = Endpoint::create(admin.clone(), setup("team-b")).await?;
    for i in 0..4 {
        a.publish(&format!("a-{i}"), None, "{}").await?;
        b.publish(&format!("b-{i}"), None, "{}").await?;
    }

    // Team A's processor, as team A: delivers everything of A's, through
    // a retry (parked and moved back) and a dead letter.
    let sink_a = Sink::start().await?;
    sink_a.script("a-1", vec![Reply::status(503)]);
    sink_a.script("a-2", vec![Reply::status(422)]);
    let creds_a: [(&str, &OsStr); 2] = [
        ("SPILLWAY_NATS_USER", OsStr::new("team-a")),
        ("SPILLWAY_NATS_PASSWORD", OsStr::new("pa")),
    ];
    let proc_a = ProcessorProc::spawn_with_env(&a.config(&sink_a.url), &nats.url, &creds_a)?;
    proc_a.wait_ready().await?;
    eventually(
        Duration::from_secs(20),
        "A's webhooks delivered",
        || async {
            let ids = sink_a.delivered_ids();
            (0..4).all(|i| i == 2 || ids.contains(&format!("a-{i}")))
        },
    )
    .await
    .with_context(|| proc_a.log_text())?;
    assert_eq!(sink_a.attempts("a-1").len(), 2, "retried once");
    eventually(Duration::from_secs(10), "A's dead letter", || async {
        a.dead_letters().await.is_ok_and(|d| d.len() == 1)
    })
    .await
    .with_context(|| proc_a.log_text())?;
    assert!(
        !proc_a.log_text().contains("Permissions Violation"),
        "{}",
        proc_a.log_text()
    );

    // A processor for B's endpoint with team A's credentials delivers
    // nothing: B's webhooks stay where they are.
    let sink_x = Sink::start().await?;
    let intruder = ProcessorProc::spawn_with_env(&b.config(&sink_x.url), &nats.url, &creds_a)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sink_x.count(), 0, "{}", intruder.log_text());
    let info = b.consumer_info("processor").await?;
    assert_eq!(info.num_pending, 4, "B's backlog is untouched");
    assert!(
        intruder.log_text().contains("ermission"),
        "the refusal is logged: {}",
        intruder.log_text()
    );
    drop(intruder);

    // Team A's own client cannot fetch B's messages either.
    let js_a = jetstream::new(connect(&nats.url, "team-a", "pa").await?);
    assert!(
        js_a.get_stream(b.names.stream()).await.is_err(),
        "B's stream info"
    );
    let raw = async_nats::ConnectOptions::with_user_and_password("team-a".into(), "pa".into())
        .custom_inbox_prefix("_INBOX.spillway.team-a")
        .connect(&nats.url)
        .await?;
    let fetched = tokio::time::timeout(
        Duration::from_secs(2),
        raw.request(
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.processor", b.names.stream()),
            "{\"batch\":1,\"expires\":1000000000}".into(),
        ),
    )
    .await;
    assert!(
        !matches!(fetched, Ok(Ok(ref m)) if !m.payload.is_empty()),
        "team A fetched from B: {fetched:?}"
    );

    // Team B's processor, as team B, delivers them.
    let sink_b = Sink::start().await?;
    let creds_b: [(&str, &OsStr); 2] = [
        ("SPILLWAY_NATS_USER", OsStr::new("team-b")),
        ("SPILLWAY_NATS_PASSWORD", OsStr::new("pb")),
    ];
    let proc_b = ProcessorProc::spawn_with_env(&b.config(&sink_b.url), &nats.url, &creds_b)?;
    eventually(
        Duration::from_secs(20),
        "B's webhooks delivered",
        || async { sink_b.delivered_ids().len() == 4 },
    )
    .await
    .with_context(|| proc_b.log_text())?;
    assert!(
        nats.log().to_lowercase().contains("violation"),
        "the server refused team A: {}",
        nats.log()
    );
    Ok(())
}
