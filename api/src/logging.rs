//! How every Spillway process logs: one format and one level for the
//! operator, the gateway and the processors (the chart's `logging.format`
//! and `logging.level`; the operator hands both to the processor pods it
//! renders).

/// Log output format.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (for log collectors).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// The name used in flags, environment variables and the chart.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        }
    }
}

/// Environment variable with the log format of the operator and processors.
pub const FORMAT_ENV: &str = "SPILLWAY_LOG_FORMAT";

/// Environment variable with the log filter (`info`, `debug`,
/// `info,async_nats=warn`, ...), as `tracing_subscriber::EnvFilter` reads
/// it.
pub const LEVEL_ENV: &str = "RUST_LOG";

/// Install the global subscriber: `format`, filtered by [`LEVEL_ENV`], else
/// `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
}
