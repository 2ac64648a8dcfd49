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

/// The log output: `format`, filtered by [`LEVEL_ENV`], else
/// `default_filter`. Exported spans ([`crate::telemetry::TARGET`]) are
/// never log lines: a static directive turns their target off, so with
/// export off their callsites are disabled outright (a dynamic filter would
/// have every such span created and then dropped).
fn fmt_layer<S>(
    format: LogFormat,
    default_filter: &str,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    #[cfg(feature = "otlp")]
    let filter = filter.add_directive(
        format!("{}=off", crate::telemetry::TARGET)
            .parse()
            .expect("a valid directive"),
    );
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_filter(filter).boxed(),
    }
}

/// What [`init`] started: the OTLP exporter, when the environment asked
/// for one (see [`crate::telemetry`]). Dropping it (or [`Telemetry::shutdown`])
/// flushes the spans not yet sent.
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Flush and stop the exporter (at most its export timeout).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("OTLP exporter shutdown: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Install the global subscriber: `format`, filtered by [`LEVEL_ENV`], else
/// `default_filter`; with the `otlp` feature, also span export when the
/// `OTEL_*` environment asks for it (`service` is the default
/// `service.name`). A broken OTLP setting is reported and export stays off:
/// logs and webhooks do not depend on it.
pub fn init(format: LogFormat, default_filter: &str, service: &'static str) -> Telemetry {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let fmt = fmt_layer(format, default_filter);
    let registry = tracing_subscriber::registry().with(fmt);
    #[cfg(feature = "otlp")]
    {
        let (provider, problem) = match crate::telemetry::provider(service) {
            Ok(p) => (p, None),
            Err(e) => (None, Some(e)),
        };
        let layer = provider
            .as_ref()
            .map(|p| crate::telemetry::layer(p, service));
        registry.with(layer).init();
        if let Some(e) = problem {
            tracing::warn!(error = %e, "OTLP trace export is off");
        } else if provider.is_some() {
            tracing::info!("exporting traces over OTLP");
        }
        Telemetry { provider }
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = service;
        registry.init();
        Telemetry::default()
    }
}

#[cfg(all(test, feature = "otlp"))]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// With export off, exported spans and debug spans are never created
    /// (the gateway makes both per request), and info events still log.
    #[test]
    fn exported_spans_cost_nothing_when_export_is_off() {
        for format in [LogFormat::Json, LogFormat::Text] {
            let sub = tracing_subscriber::registry().with(fmt_layer(format, "info"));
            tracing::subscriber::with_default(sub, || {
                let otel = tracing::info_span!(target: crate::telemetry::TARGET, "publish");
                assert!(otel.is_disabled(), "{format:?}");
                assert!(tracing::debug_span!("webhook").is_disabled());
                assert!(!tracing::info_span!("logged").is_disabled());
            });
        }
    }
}
