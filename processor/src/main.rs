//! `spillway-processor`: delivers one WebhookEndpoint's stored webhooks.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use spillway_api::nats::{NatsArgs, NatsAuth, SettingNames};
use spillway_api::wire::PROCESSOR_CONFIG_ENV;
use spillway_processor::run;
use spillway_processor::settings::Settings;

/// Deliver a WebhookEndpoint's stored webhooks to its sink.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// File holding the ProcessorConfig JSON (default: the
    /// SPILLWAY_PROCESSOR_CONFIG environment variable).
    #[arg(long)]
    config: Option<PathBuf>,
    /// NATS connection (URL default `nats://127.0.0.1:4222`), the same
    /// flags as the operator's, gateway's and CLI's.
    #[command(flatten)]
    nats: NatsArgs,
    /// NATS user (with --nats-password).
    #[arg(long, env = "SPILLWAY_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "SPILLWAY_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "SPILLWAY_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SPILLWAY_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
    /// After SIGTERM, how long in-flight deliveries may take before they are
    /// handed back (keep below the pod's termination grace period).
    #[arg(long, env = "SPILLWAY_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime_duration)]
    shutdown_timeout: Duration,
    /// Log format.
    #[arg(long, env = spillway_api::logging::FORMAT_ENV, value_enum, default_value_t)]
    log_format: LogFormat,
}

use spillway_api::logging::LogFormat;

fn humantime_duration(s: &str) -> Result<Duration, String> {
    spillway_api::duration::parse(s).map_err(|e| e.to_string())
}

fn load_settings(args: &Args) -> Result<Settings> {
    let json = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --config {}", path.display()))?,
        None => std::env::var(PROCESSOR_CONFIG_ENV).with_context(|| {
            format!("no configuration: set {PROCESSOR_CONFIG_ENV} or pass --config FILE")
        })?,
    };
    Ok(Settings::from_json(&json)?)
}

/// The older name of SPILLWAY_NATS_CREDS_FILE, still read when that is unset.
const LEGACY_CREDS_ENV: &str = "SPILLWAY_NATS_CREDS";

/// The NATS credentials and TLS files, checked by the same code as the
/// gateway's and the operator's.
fn nats_auth(args: &Args) -> NatsAuth {
    let mut auth = args.nats.auth();
    if auth.creds_file.is_none() {
        auth.creds_file = std::env::var_os(LEGACY_CREDS_ENV).map(PathBuf::from);
    }
    auth
}

/// Where the processor finds NATS unless told otherwise.
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

async fn connect(args: &Args, endpoint: &str) -> Result<async_nats::Client> {
    let mut opts = nats_auth(args).connect_options(SettingNames::FLAGS)?;
    if let (Some(u), Some(p)) = (&args.nats_user, &args.nats_password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &args.nats_token {
        opts = opts.token(t.clone());
    }
    opts = opts.name("spillway-processor");
    // Replies (fetched messages, PubAcks) come to inboxes under the
    // namespace, so a per-namespace NATS user needs no `_INBOX.>` (which
    // would let it read every other client's replies).
    let namespace = endpoint.split_once('/').map_or(endpoint, |(ns, _)| ns);
    opts = opts.custom_inbox_prefix(spillway_api::names::inbox_prefix(namespace));
    // Server errors (e.g. a permission violation for the sink-notice
    // subscription) would otherwise only show at debug level.
    opts = opts.event_callback(|event| async move {
        match event {
            async_nats::Event::ServerError(e) => tracing::warn!(error = %e, "NATS server error"),
            other => tracing::debug!(event = %other, "NATS connection event"),
        }
    });
    let url = args.nats.url_or(DEFAULT_NATS_URL);
    let servers =
        spillway_api::nats::server_addrs(&url).map_err(|e| anyhow::anyhow!("--nats-url: {e}"))?;
    opts.connect(servers).await.with_context(|| {
        format!(
            "connecting to NATS at {}",
            spillway_api::nats::redact_url(&url)
        )
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let telemetry = spillway_api::logging::init(
        args.log_format,
        "info,async_nats=warn",
        "spillway-processor",
    );
    let settings = load_settings(&args)?;
    tracing::info!(
        endpoint = %settings.endpoint,
        stream = %settings.stream,
        consumers = ?settings.consumers,
        sink_host = settings.sink_url.host_str().unwrap_or(""),
        concurrency = settings.concurrency,
        per_replica = settings.concurrency_per_replica,
        "starting"
    );
    let nats = connect(&args, &settings.endpoint).await?;
    let mut running = run::start(settings, nats, args.admin_addr).await?;
    let signal = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        std::io::Result::Ok(())
    };
    tokio::select! {
        r = running.wait() => r?,
        s = signal => {
            s.context("installing signal handlers")?;
            running.shutdown(args.shutdown_timeout).await?;
        }
    }
    tracing::info!("stopped");
    telemetry.shutdown();
    Ok(())
}
