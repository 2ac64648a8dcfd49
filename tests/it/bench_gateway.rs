//! The gateway benchmark's smoke run (`make bench-gateway` runs it for
//! real): every phase tiny, against debug binaries, so the benchmark cannot
//! rot. It checks that the run completes and that every 2xx is stored,
//! never timing. The Go bridge is built from `../shared/peers/gobridge`
//! (or `SPILLWAY_PEERS_DIR/gobridge`) when that folder exists; without it
//! the bridge's columns are left out and the run says so.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use spillway_tests::{bin_path, root, tool};
use tokio::process::Command;

fn peers() -> PathBuf {
    std::env::var_os("SPILLWAY_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/peers"))
}

#[tokio::test]
async fn the_gateway_benchmark_runs_and_every_2xx_is_stored() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let loadgen = bin_path("examples/loadgen");
    let mut cmd = Command::new(&loadgen);
    cmd.arg("--smoke")
        .arg("--gateway-bin")
        .arg(bin_path("spillway-gateway"))
        .arg("--nats-server")
        .arg(tool("nats-server"))
        .arg("--wrk")
        .arg(tool("wrk"))
        .arg("--out")
        .arg(dir.path().join("gateway.md"))
        .env("RUST_BACKTRACE", "0");
    let source = peers().join("gobridge");
    let bridge = source.exists();
    if bridge {
        let bin = dir.path().join("gobridge");
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&source)
            .output()
            .await
            .context("go build of the bridge")?;
        if !out.status.success() {
            bail!("go build: {}", String::from_utf8_lossy(&out.stderr));
        }
        cmd.arg("--bridge-bin").arg(bin);
    } else {
        println!(
            "{} not found: the smoke run leaves the Go bridge out",
            source.display()
        );
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), cmd.output())
        .await
        .context("the smoke run took over 4 minutes")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("bench: every 2xx is stored"), "{stdout}");
    let md = std::fs::read_to_string(dir.path().join("gateway.md"))?;
    assert!(md.contains("\n| 4 | "), "one row at 4 connections:\n{md}");
    // The HTTP floor (hyper + publish, nothing else) is measured beside.
    assert!(stdout.contains("http floor       c=4"), "{stdout}");
    assert!(md.contains("the HTTP floor: p99"), "{md}");
    assert_eq!(
        md.contains("| – |"),
        !bridge,
        "the bridge's columns are filled exactly when it ran:\n{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("gateway.svg"))?;
    assert!(
        svg.starts_with("<svg") && svg.contains("Spillway gateway"),
        "{svg}"
    );
    Ok(())
}
