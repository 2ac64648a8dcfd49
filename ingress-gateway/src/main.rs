//! The `spillway-gateway` binary.
use anyhow::Context;
use clap::Parser;
use spillway_gateway::config::{Cli, Config};

/// mimalloc: under load glibc malloc took 15 % of the gateway's CPU, much
/// of it waiting on arena locks (docs/benchmarks/gateway.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(Cli::parse()).context("loading configuration")?;
    let telemetry = spillway_api::logging::init(config.log_format, "info", "spillway-gateway");
    let running = spillway_gateway::run::start(&config, None)
        .await
        .context("starting the gateway")?;
    let trigger = running.shutdown_trigger();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        let _ = trigger.send(true);
    });
    running.wait().await;
    telemetry.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
