//! Gateway configuration, layered: built-in defaults, then an optional YAML
//! file (`--config`), then environment variables and flags. Validated before
//! anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use spillway_api::duration;

/// Where endpoints come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Watch WebhookEndpoints and Secrets in the cluster.
    Kubernetes,
    /// Read manifests from `endpointsFile` (local use).
    File,
}

/// Command line and environment. Every option may also be set in the config
/// file under its camelCase name; flags and environment win over the file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "spillway-gateway",
    version,
    about = "Spillway's ingress gateway"
)]
pub struct Cli {
    /// YAML config file.
    #[arg(long, env = "SPILLWAY_GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address webhooks are served on [default 0.0.0.0:8080].
    #[arg(long, env = "SPILLWAY_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default 0.0.0.0:9090].
    #[arg(long, env = "SPILLWAY_GATEWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// NATS connection [default URL nats://127.0.0.1:4222]: the same flags
    /// as the operator's, processor's and CLI's; each set flag overrides
    /// the config file's `nats*` setting.
    #[command(flatten)]
    pub nats: spillway_api::nats::NatsArgs,
    /// Endpoint source [default kubernetes].
    #[arg(long, env = "SPILLWAY_GATEWAY_SOURCE")]
    pub source: Option<SourceKind>,
    /// Only watch this namespace (kubernetes source) [default: all].
    #[arg(long, env = "SPILLWAY_GATEWAY_NAMESPACE")]
    pub namespace: Option<String>,
    /// Manifests file (file source).
    #[arg(long, env = "SPILLWAY_GATEWAY_ENDPOINTS_FILE")]
    pub endpoints_file: Option<PathBuf>,
    /// Directory of `<secret>/<key>` files (file source).
    #[arg(long, env = "SPILLWAY_GATEWAY_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// How often the file source looks for changes of the endpoints file and
    /// the secret files it references [default 1s].
    #[arg(long, env = "SPILLWAY_GATEWAY_FILE_POLL_INTERVAL")]
    pub file_poll_interval: Option<String>,
    /// Public base URL of the gateway, e.g. `https://hooks.example.com`
    /// (Twilio signs the public URL).
    #[arg(long, env = "SPILLWAY_GATEWAY_PUBLIC_BASE_URL")]
    pub public_base_url: Option<String>,
    /// Deadline from publish to PubAck [default 5s].
    #[arg(long, env = "SPILLWAY_GATEWAY_PUBLISH_TIMEOUT")]
    pub publish_timeout: Option<String>,
    /// Deadline for reading a request body [default 10s].
    #[arg(long, env = "SPILLWAY_GATEWAY_BODY_TIMEOUT")]
    pub body_timeout: Option<String>,
    /// Deadline for reading request headers [default 10s].
    #[arg(long, env = "SPILLWAY_GATEWAY_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// Close connections that send nothing for this long [default 60s].
    #[arg(long, env = "SPILLWAY_GATEWAY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Largest request head in bytes [default 65536].
    #[arg(long, env = "SPILLWAY_GATEWAY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Publishes awaiting PubAck at once [default 4096].
    #[arg(long, env = "SPILLWAY_GATEWAY_MAX_IN_FLIGHT")]
    pub max_in_flight_publishes: Option<usize>,
    /// Webhook requests handled at once (body read, verification, publish);
    /// more are answered 503 before their body is read [default 256].
    #[arg(long, env = "SPILLWAY_GATEWAY_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Gateway replicas that share each endpoint's `ingress.rateLimit`:
    /// each one enforces 1/N of it (the chart sets its replica count)
    /// [default 1].
    #[arg(long, env = "SPILLWAY_GATEWAY_RATE_LIMIT_REPLICAS")]
    pub rate_limit_replicas: Option<u32>,
    /// Memory, in bytes, that bodies of requests not yet verified may hold
    /// at once, across all requests; keep it well below the pod's memory
    /// limit. A quarter is kept for small bodies (≤ 64 KiB, what providers
    /// send) [default 67108864].
    #[arg(long, env = "SPILLWAY_GATEWAY_BODY_BUDGET_BYTES")]
    pub body_budget_bytes: Option<u64>,
    /// Slowest accepted body upload, bytes per second, after a 2 s grace;
    /// slower senders get 408 [default 16384].
    #[arg(long, env = "SPILLWAY_GATEWAY_MIN_BODY_BYTES_PER_SECOND")]
    pub min_body_bytes_per_second: Option<u64>,
    /// Webhook requests one client address may have in progress at once
    /// (0: no limit); more get 429. Only useful where the gateway sees
    /// the clients' addresses, not a load balancer's [default 0].
    #[arg(long, env = "SPILLWAY_GATEWAY_MAX_REQUESTS_PER_CLIENT")]
    pub max_requests_per_client: Option<usize>,
    /// HTTP/2 streams one connection may have open at once [default 64].
    #[arg(long, env = "SPILLWAY_GATEWAY_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,
    /// Retry-After on 503 [default 5s].
    #[arg(long, env = "SPILLWAY_GATEWAY_RETRY_AFTER")]
    pub retry_after: Option<String>,
    /// Time given to in-flight requests on shutdown [default 25s].
    #[arg(long, env = "SPILLWAY_GATEWAY_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// On SIGTERM, time /readyz answers 503 while webhooks are still served,
    /// before the listener closes; `0s` to close at once [default 5s].
    #[arg(long, env = "SPILLWAY_GATEWAY_DRAIN_DELAY")]
    pub drain_delay: Option<String>,
    /// Log format [default json].
    #[arg(long, env = "SPILLWAY_GATEWAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// Log output format (the one every Spillway process uses).
pub use spillway_api::logging::LogFormat;

/// The config file: the same options as [`Cli`], camelCase.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    nats_url: Option<String>,
    nats_creds_file: Option<PathBuf>,
    nats_token_file: Option<PathBuf>,
    nats_user_file: Option<PathBuf>,
    nats_password_file: Option<PathBuf>,
    nats_tls_ca_file: Option<PathBuf>,
    nats_tls_cert_file: Option<PathBuf>,
    nats_tls_key_file: Option<PathBuf>,
    nats_tls_required: Option<bool>,
    source: Option<SourceKind>,
    namespace: Option<String>,
    endpoints_file: Option<PathBuf>,
    secrets_dir: Option<PathBuf>,
    file_poll_interval: Option<String>,
    public_base_url: Option<String>,
    publish_timeout: Option<String>,
    body_timeout: Option<String>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_header_bytes: Option<usize>,
    max_in_flight_publishes: Option<usize>,
    max_concurrent_requests: Option<usize>,
    rate_limit_replicas: Option<u32>,
    body_budget_bytes: Option<u64>,
    min_body_bytes_per_second: Option<u64>,
    max_requests_per_client: Option<usize>,
    max_streams_per_connection: Option<u32>,
    retry_after: Option<String>,
    shutdown_grace: Option<String>,
    drain_delay: Option<String>,
    log_format: Option<LogFormat>,
}

/// The configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The config file is not valid YAML for this schema.
    #[error("parsing config file {0}: {1}")]
    Parse(PathBuf, Box<serde_saphyr::Error>),
    /// Invalid values; every problem is listed.
    #[error("invalid configuration: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Webhook listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// NATS URL(s).
    pub nats_url: String,
    /// NATS credentials file (`.creds`).
    pub nats_creds_file: Option<PathBuf>,
    /// File holding a NATS token.
    pub nats_token_file: Option<PathBuf>,
    /// File holding a NATS user name.
    pub nats_user_file: Option<PathBuf>,
    /// File holding that user's password.
    pub nats_password_file: Option<PathBuf>,
    /// CA certificates to verify the NATS server with.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate for NATS mutual TLS.
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Client key for NATS mutual TLS.
    pub nats_tls_key_file: Option<PathBuf>,
    /// Refuse plaintext connections to NATS.
    pub nats_tls_required: bool,
    /// Endpoint source.
    pub source: SourceKind,
    /// Namespace scope of the kubernetes source.
    pub namespace: Option<String>,
    /// Manifests file of the file source.
    pub endpoints_file: Option<PathBuf>,
    /// Secrets directory of the file source.
    pub secrets_dir: Option<PathBuf>,
    /// Change polling interval of the file source.
    pub file_poll_interval: Duration,
    /// Public base URL.
    pub public_base_url: Option<String>,
    /// Publish deadline.
    pub publish_timeout: Duration,
    /// Body read deadline.
    pub body_timeout: Duration,
    /// Header read deadline.
    pub header_read_timeout: Duration,
    /// Idle connection timeout.
    pub idle_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Publishes in flight.
    pub max_in_flight_publishes: usize,
    /// Webhook requests handled at once.
    pub max_concurrent_requests: usize,
    /// Gateway replicas sharing each endpoint's rate limit.
    pub rate_limit_replicas: u32,
    /// Bytes that unverified bodies may hold at once.
    pub body_budget_bytes: u64,
    /// Slowest accepted body upload after the grace, bytes per second.
    pub min_body_bytes_per_second: u64,
    /// Requests in progress per client address (0: no limit).
    pub max_requests_per_client: usize,
    /// HTTP/2 streams open per connection.
    pub max_streams_per_connection: u32,
    /// Retry-After on 503.
    pub retry_after: Duration,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// Time between the shutdown signal (readiness turns false) and closing
    /// the listener.
    pub drain_delay: Duration,
    /// Log format.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([0, 0, 0, 0], 8080).into(),
            admin_listen: ([0, 0, 0, 0], 9090).into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_creds_file: None,
            nats_token_file: None,
            nats_user_file: None,
            nats_password_file: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_tls_required: false,
            source: SourceKind::Kubernetes,
            namespace: None,
            endpoints_file: None,
            secrets_dir: None,
            file_poll_interval: Duration::from_secs(1),
            public_base_url: None,
            publish_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_in_flight_publishes: 4096,
            max_concurrent_requests: 256,
            rate_limit_replicas: 1,
            body_budget_bytes: 64 * 1024 * 1024,
            min_body_bytes_per_second: 16 * 1024,
            max_requests_per_client: 0,
            max_streams_per_connection: 64,
            retry_after: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(25),
            drain_delay: Duration::from_secs(5),
            log_format: LogFormat::Json,
        }
    }
}

impl Config {
    /// Layer defaults, the config file named by `cli.config` and `cli`
    /// (flags and environment), then validate.
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| ConfigError::Read(p.clone(), e))?;
                if text.trim().is_empty() {
                    FileConfig::default()
                } else {
                    serde_saphyr::from_str(&text)
                        .map_err(|e| ConfigError::Parse(p.clone(), Box::new(e)))?
                }
            }
            None => FileConfig::default(),
        };
        let d = Config::default();
        let mut problems = Vec::new();
        // Zero is allowed here: close the listener right away.
        let drain_delay = match cli.drain_delay.or(file.drain_delay) {
            None => d.drain_delay,
            Some(s) => duration::parse(&s).unwrap_or_else(|e| {
                problems.push(format!("drainDelay: {e}"));
                d.drain_delay
            }),
        };
        let mut dur = |name: &str, v: Option<String>, default: Duration| match v {
            None => default,
            Some(s) => match duration::parse(&s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(format!("{name} must be more than 0"));
                    default
                }
                Err(e) => {
                    problems.push(format!("{name}: {e}"));
                    default
                }
            },
        };
        let c = Config {
            listen: cli.listen.or(file.listen).unwrap_or(d.listen),
            admin_listen: cli
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(d.admin_listen),
            nats_url: cli.nats.url.or(file.nats_url).unwrap_or(d.nats_url),
            nats_creds_file: cli.nats.creds_file.or(file.nats_creds_file),
            nats_token_file: cli.nats.token_file.or(file.nats_token_file),
            nats_user_file: cli.nats.user_file.or(file.nats_user_file),
            nats_password_file: cli.nats.password_file.or(file.nats_password_file),
            nats_tls_ca_file: cli.nats.tls_ca_file.or(file.nats_tls_ca_file),
            nats_tls_cert_file: cli.nats.tls_cert_file.or(file.nats_tls_cert_file),
            nats_tls_key_file: cli.nats.tls_key_file.or(file.nats_tls_key_file),
            nats_tls_required: cli
                .nats
                .tls_required
                .or(file.nats_tls_required)
                .unwrap_or(d.nats_tls_required),
            source: cli.source.or(file.source).unwrap_or(d.source),
            namespace: cli.namespace.or(file.namespace),
            endpoints_file: cli.endpoints_file.or(file.endpoints_file),
            secrets_dir: cli.secrets_dir.or(file.secrets_dir),
            file_poll_interval: dur(
                "filePollInterval",
                cli.file_poll_interval.or(file.file_poll_interval),
                d.file_poll_interval,
            ),
            public_base_url: cli.public_base_url.or(file.public_base_url),
            publish_timeout: dur(
                "publishTimeout",
                cli.publish_timeout.or(file.publish_timeout),
                d.publish_timeout,
            ),
            body_timeout: dur(
                "bodyTimeout",
                cli.body_timeout.or(file.body_timeout),
                d.body_timeout,
            ),
            header_read_timeout: dur(
                "headerReadTimeout",
                cli.header_read_timeout.or(file.header_read_timeout),
                d.header_read_timeout,
            ),
            idle_timeout: dur(
                "idleTimeout",
                cli.idle_timeout.or(file.idle_timeout),
                d.idle_timeout,
            ),
            max_header_bytes: cli
                .max_header_bytes
                .or(file.max_header_bytes)
                .unwrap_or(d.max_header_bytes),
            max_in_flight_publishes: cli
                .max_in_flight_publishes
                .or(file.max_in_flight_publishes)
                .unwrap_or(d.max_in_flight_publishes),
            max_concurrent_requests: cli
                .max_concurrent_requests
                .or(file.max_concurrent_requests)
                .unwrap_or(d.max_concurrent_requests),
            rate_limit_replicas: cli
                .rate_limit_replicas
                .or(file.rate_limit_replicas)
                .unwrap_or(d.rate_limit_replicas),
            body_budget_bytes: cli
                .body_budget_bytes
                .or(file.body_budget_bytes)
                .unwrap_or(d.body_budget_bytes),
            min_body_bytes_per_second: cli
                .min_body_bytes_per_second
                .or(file.min_body_bytes_per_second)
                .unwrap_or(d.min_body_bytes_per_second),
            max_requests_per_client: cli
                .max_requests_per_client
                .or(file.max_requests_per_client)
                .unwrap_or(d.max_requests_per_client),
            max_streams_per_connection: cli
                .max_streams_per_connection
                .or(file.max_streams_per_connection)
                .unwrap_or(d.max_streams_per_connection)
                .max(1),
            retry_after: dur(
                "retryAfter",
                cli.retry_after.or(file.retry_after),
                d.retry_after,
            ),
            shutdown_grace: dur(
                "shutdownGrace",
                cli.shutdown_grace.or(file.shutdown_grace),
                d.shutdown_grace,
            ),
            drain_delay,
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
        };
        if c.source == SourceKind::File && c.endpoints_file.is_none() {
            problems.push("source file needs endpointsFile".into());
        }
        if let Some(u) = &c.public_base_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            problems.push("publicBaseUrl must start with http:// or https://".into());
        }
        if c.max_header_bytes < 8192 {
            problems.push("maxHeaderBytes must be at least 8192".into());
        }
        if c.max_in_flight_publishes == 0 {
            problems.push("maxInFlightPublishes must be at least 1".into());
        }
        if c.max_concurrent_requests == 0 {
            problems.push("maxConcurrentRequests must be at least 1".into());
        }
        if c.rate_limit_replicas == 0 {
            problems.push("rateLimitReplicas must be at least 1".into());
        }
        if c.body_budget_bytes < 16 * 1024 * 1024 {
            // Three quarters of it must hold the largest body (8 MiB).
            problems.push("bodyBudgetBytes must be at least 16 MiB".into());
        }
        if c.nats_url.trim().is_empty() {
            problems.push("natsUrl must not be empty".into());
        }
        // The NATS credentials and TLS files are checked (present, readable,
        // well-formed, certificate and key together) by
        // `nats::connect_options` when the gateway starts.
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_then_flags() {
        let c = Config::load(Cli::default()).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.publish_timeout, Duration::from_secs(5));
        assert_eq!(c.max_concurrent_requests, 256);
        assert_eq!(c.drain_delay, Duration::from_secs(5));
        let zero = Cli::try_parse_from(["spillway-gateway", "--drain-delay", "0s"]).unwrap();
        assert_eq!(Config::load(zero).unwrap().drain_delay, Duration::ZERO);

        let dir = std::env::temp_dir().join(format!("spillway-gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gw.yaml");
        std::fs::write(
            &f,
            "publishTimeout: 2s\nlisten: 127.0.0.1:1234\nsource: file\nendpointsFile: /x.yaml\nmaxConcurrentRequests: 7\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "spillway-gateway",
            "--config",
            f.to_str().unwrap(),
            "--listen",
            "127.0.0.1:4321",
        ])
        .unwrap();
        let c = Config::load(cli).unwrap();
        assert_eq!(
            c.publish_timeout,
            Duration::from_secs(2),
            "file over default"
        );
        assert_eq!(c.listen.port(), 4321, "flag over file");
        assert_eq!(c.max_concurrent_requests, 7, "file over default");
        assert_eq!(c.source, SourceKind::File);

        std::fs::write(&f, "bogusKey: 1\n").unwrap();
        let cli =
            Cli::try_parse_from(["spillway-gateway", "--config", f.to_str().unwrap()]).unwrap();
        assert!(matches!(Config::load(cli), Err(ConfigError::Parse(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nats_files_are_layered_and_checked() {
        let dir = std::env::temp_dir().join(format!("spillway-gw-nats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("gw.yaml");
        let creds = dir.join("gw.creds");
        std::fs::write(&creds, "").unwrap();
        std::fs::write(
            &f,
            format!(
                "natsCredsFile: {}\nnatsTlsRequired: true\n",
                creds.display()
            ),
        )
        .unwrap();
        let cli =
            Cli::try_parse_from(["spillway-gateway", "--config", f.to_str().unwrap()]).unwrap();
        let c = Config::load(cli).unwrap();
        assert_eq!(c.nats_creds_file.as_deref(), Some(creds.as_path()));
        assert!(c.nats_tls_required, "file over default");
        let cli = Cli::try_parse_from([
            "spillway-gateway",
            "--config",
            f.to_str().unwrap(),
            "--nats-tls-required=false",
        ])
        .unwrap();
        assert!(
            !Config::load(cli).unwrap().nats_tls_required,
            "flag over file"
        );
        let cli = Cli::try_parse_from(["spillway-gateway", "--nats-tls-required"]).unwrap();
        assert!(Config::load(cli).unwrap().nats_tls_required, "bare flag");

        // The files themselves are checked by the shared NATS options, with
        // the config file's spelling of the setting.
        let check = |cli: Cli| match crate::nats::connect_options(&Config::load(cli).unwrap()) {
            Ok(_) => panic!("expected unusable NATS files"),
            Err(e) => e.to_string(),
        };
        let e = check(Cli {
            nats: spillway_api::nats::NatsArgs {
                tls_cert_file: Some(creds.clone()),
                ..Default::default()
            },
            ..Cli::default()
        });
        assert!(e.starts_with("natsTlsCertFile "), "{e}");
        assert!(e.ends_with("needs natsTlsKeyFile"), "{e}");
        let e = check(Cli {
            nats: spillway_api::nats::NatsArgs {
                tls_ca_file: Some(dir.join("missing-ca.pem")),
                ..Default::default()
            },
            ..Cli::default()
        });
        assert!(e.starts_with("natsTlsCaFile "), "{e}");
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_values_are_all_reported() {
        let cli = Cli {
            source: Some(SourceKind::File),
            publish_timeout: Some("soon".into()),
            public_base_url: Some("hooks.example.com".into()),
            max_header_bytes: Some(10),
            max_concurrent_requests: Some(0),
            drain_delay: Some("5".into()),
            ..Cli::default()
        };
        let Err(ConfigError::Invalid(p)) = Config::load(cli) else {
            panic!("expected invalid")
        };
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p.iter().any(|p| p.starts_with("drainDelay: ")), "{p:?}");
        assert!(p.contains(&"maxConcurrentRequests must be at least 1".to_owned()));
    }
}
