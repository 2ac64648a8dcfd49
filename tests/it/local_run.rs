//! `make run` end to end: the local Spillway starts, applies the examples,
//! sends signed and bad webhooks, and every accepted one reaches the sink.

use std::process::Command;

use spillway_tests::{bin_path, free_port};

#[test]
fn local_spillway_runs_the_demo_end_to_end() {
    let out = Command::new(bin_path("spillway-local"))
        .args(["--exit-after-demo", "--port", &free_port().to_string()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("spillway-local runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    for want in [
        "rejected as expected {\"error\":\"bad_signature\"}",
        "rejected as expected {\"error\":\"timestamp_out_of_tolerance\"}",
        "provider retry (2nd, deduplicated)",
        "webhook_callback_verification",
        "unknown path                              404",
        "Spillway is running",
        "spillway attempts demo/",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("delivered: "))
        .unwrap_or_else(|| panic!("no summary in\n{stdout}"));
    let (delivered, expected) = summary
        .trim_start_matches("delivered: ")
        .split_once(" accepted")
        .and_then(|(counts, _)| counts.split_once(" of "))
        .map(|(a, b)| (a.parse::<u32>().unwrap(), b.parse::<u32>().unwrap()))
        .expect("summary has counts");
    assert_eq!(delivered, expected, "{summary}");
    // examples/github.yaml's listeners: the push event to CI, the opened
    // issue to the bot (the closed one filtered out).
    for listener in ["github-ci", "github-bot"] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(listener))
            .unwrap_or_else(|| panic!("no deliveries row for {listener} in\n{stdout}"));
        assert!(row.trim_end().ends_with(" 1"), "{listener}: {row}");
    }
    assert!(expected >= 9, "one webhook per example at least: {summary}");
    // The summary shows the attempts of the webhook sent twice: one
    // delivery, recorded with the sink's answer.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("spillway attempts demo/"))
        .skip(1)
        .take(2)
        .collect();
    assert!(
        table.len() == 2 && table[0].contains("LISTENER") && table[1].contains("delivered"),
        "no attempts table in\n{stdout}"
    );
}
