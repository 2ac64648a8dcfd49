//! The processor's configuration, parsed and checked once at start-up.

use std::num::NonZeroU32;
use std::time::Duration;

use spillway_api::wire::{DrainConfig, ProcessorConfig, RetryConfig};

/// A [`ProcessorConfig`] that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON did not parse.
    #[error("processor config is not valid JSON for ProcessorConfig: {0}")]
    Json(#[from] serde_path_to_error::Error<serde_json::Error>),
    /// A field is out of range or malformed.
    #[error("processor config field {field}: {problem}")]
    Field {
        /// The offending field (camelCase, as in the JSON).
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn field(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        problem: problem.into(),
    }
}

/// Delay used when the config lists no backoff at all.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);

/// Everything the delivery loop needs, with durations parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `namespace/name` of the endpoint.
    pub endpoint: String,
    /// The main stream.
    pub stream: String,
    /// Durable pull consumers to serve.
    pub consumers: Vec<String>,
    /// Dead-letter subject, when dead letters are kept.
    pub dead_letter_subject: Option<String>,
    /// Where deliveries go.
    pub sink_url: reqwest::Url,
    /// `sinkUrl` exactly as configured (parsing normalises it), so that sink
    /// notices name the sink as the operator renders it.
    pub sink_url_text: String,
    /// Global cap on deliveries in flight.
    pub concurrency: u32,
    /// This pod's cap on deliveries in flight.
    pub concurrency_per_replica: u32,
    /// Per-delivery timeout.
    pub timeout: Duration,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Retry delays; the last repeats.
    pub backoff: Vec<Duration>,
    /// This pod's share of the delivery rate limit, if any.
    pub rate_share: Option<RateShare>,
    /// Do not pull while true.
    pub paused: bool,
    /// File with the outbound signing secret.
    pub signing_secret_file: Option<String>,
    /// Where attempts are recorded (none with an older operator's config).
    pub attempts: Option<spillway_api::wire::AttemptsConfig>,
    /// Where failed deliveries wait out their delay, off the cap; `None`:
    /// on their own consumer (ordered endpoints).
    pub retry: Option<RetryConfig>,
    /// Consumers of a legacy stream to serve as well.
    pub drain: Option<DrainConfig>,
    /// Webhooks received longer ago are dead-lettered (`expired`).
    pub expire_after: Option<Duration>,
    /// The listener's selection; `None`: every webhook.
    pub filter: Option<spillway_api::filter::Filter>,
}

impl Settings {
    /// Parse the JSON form (as in `SPILLWAY_PROCESSOR_CONFIG`).
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        // The error names the field (`timeout: invalid duration ...`).
        let de = &mut serde_json::Deserializer::from_str(json);
        Self::from_config(serde_path_to_error::deserialize(de)?)
    }

    /// Check a config and parse its durations.
    pub fn from_config(c: ProcessorConfig) -> Result<Self, ConfigError> {
        if c.stream.is_empty() {
            return Err(field("stream", "must not be empty"));
        }
        if c.consumers.is_empty() || c.consumers.iter().any(String::is_empty) {
            return Err(field(
                "consumers",
                "needs at least one non-empty consumer name",
            ));
        }
        let sink_url = reqwest::Url::parse(&c.sink_url)
            .map_err(|e| field("sinkUrl", format!("not an absolute URL: {e}")))?;
        if !matches!(sink_url.scheme(), "http" | "https") {
            return Err(field("sinkUrl", "must be an http or https URL"));
        }
        if c.concurrency == 0 {
            return Err(field("concurrency", "must be at least 1"));
        }
        if c.concurrency_per_replica == 0 {
            return Err(field("concurrencyPerReplica", "must be at least 1"));
        }
        if c.max_attempts == 0 {
            return Err(field("maxAttempts", "must be at least 1"));
        }
        let timeout = c.timeout.get();
        if timeout.is_zero() {
            return Err(field("timeout", "must be positive"));
        }
        let backoff: Vec<_> = c.backoff.iter().map(|b| b.get()).collect();
        let expire_after = c.expire_after.map(|d| d.get()).filter(|d| !d.is_zero());
        let rate_share = match c.rate_limit_per_second {
            None => None,
            Some(0) => return Err(field("rateLimitPerSecond", "must be at least 1 when set")),
            // A pod's share of the rate is one over the most pods that
            // run; older configs say it through the concurrency split.
            Some(r) if c.max_replicas > 0 => Some(split_rate(r, 1, c.max_replicas)),
            Some(r) => Some(split_rate(r, c.concurrency_per_replica, c.concurrency)),
        };
        if let Some(r) = &c.retry
            && [&r.stream, &r.subject, &r.consumer, &r.due_subject]
                .iter()
                .any(|v| v.is_empty())
        {
            return Err(field(
                "retry",
                "stream, subject, consumer and dueSubject must be set",
            ));
        }
        let filter = match &c.filter {
            None => None,
            Some(f) => Some(
                spillway_api::filter::Filter::compile(&f.event_types, f.expression.as_deref())
                    .map_err(|e| field("filter", e))?,
            )
            .filter(|f| !f.is_open()),
        };
        Ok(Self {
            filter,
            endpoint: c.endpoint,
            stream: c.stream,
            consumers: c.consumers,
            dead_letter_subject: c.dead_letter_subject.filter(|s| !s.is_empty()),
            sink_url,
            sink_url_text: c.sink_url,
            concurrency: c.concurrency,
            concurrency_per_replica: c.concurrency_per_replica,
            timeout,
            max_attempts: c.max_attempts,
            backoff,
            rate_share,
            paused: c.paused,
            signing_secret_file: c.signing_secret_file.filter(|s| !s.is_empty()),
            attempts: c.attempts,
            retry: c.retry,
            drain: c
                .drain
                .filter(|d| !d.stream.is_empty() && !d.consumers.is_empty()),
            expire_after,
        })
    }

    /// Delay before the retry that follows failed attempt `attempt` (1-based):
    /// `backoff[attempt-1]`, the last entry repeating.
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        backoff_after(&self.backoff, attempt)
    }
}

/// See [`Settings::backoff_after`].
pub fn backoff_after(backoff: &[Duration], attempt: u32) -> Duration {
    let i = (attempt.max(1) - 1) as usize;
    backoff
        .get(i)
        .or(backoff.last())
        .copied()
        .unwrap_or(DEFAULT_BACKOFF)
}

/// A pod's share of the endpoint's delivery rate: one delivery per
/// `interval`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateShare {
    /// Time between deliveries at the sustained rate.
    pub interval: Duration,
    /// Deliveries allowed at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// This pod's share of a global rate: the fraction `part / whole` (one over
/// the most pods the operator runs, or in older configs the pod's share of
/// the concurrency), not rounded up, so the pods never exceed `rate`
/// together; the burst is the share rounded down (at least 1).
pub fn split_rate(rate: u32, per_replica: u32, concurrency: u32) -> RateShare {
    let share = f64::from(rate.max(1)) * f64::from(per_replica.clamp(1, concurrency.max(1)))
        / f64::from(concurrency.max(1));
    RateShare {
        interval: Duration::from_secs_f64(1.0 / share),
        // Truncation is the point: never more than the share at once.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        burst: NonZeroU32::new(share.floor() as u32).unwrap_or(NonZeroU32::MIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_api::duration::GoDuration;

    fn config() -> ProcessorConfig {
        ProcessorConfig {
            endpoint: "default/gh".into(),
            stream: "spillway_default_gh".into(),
            consumers: vec!["processor".into()],
            dead_letter_subject: Some("spillway.dlq.default_gh".into()),
            sink_url: "http://127.0.0.1:8080/hook".into(),
            concurrency: 10,
            concurrency_per_replica: 4,
            max_replicas: 0,
            retry: None,
            drain: None,
            expire_after: Some(GoDuration::from_secs(72 * 3600)),
            timeout: GoDuration::from_secs(30),
            max_attempts: 5,
            backoff: [1, 5, 30].map(GoDuration::from_secs).to_vec(),
            rate_limit_per_second: None,
            paused: false,
            signing_secret_file: None,
            attempts: None,
            filter: None,
        }
    }

    #[test]
    fn a_filter_that_does_not_compile_names_the_field() {
        let mut c = config();
        c.filter = Some(spillway_api::wire::FilterConfig {
            event_types: vec!["push".into()],
            expression: Some("body.ref ==".into()),
        });
        let err = Settings::from_config(c.clone()).unwrap_err().to_string();
        assert!(
            err.contains("filter") && err.contains("does not compile"),
            "{err}"
        );
        c.filter = Some(spillway_api::wire::FilterConfig {
            event_types: vec![],
            expression: None,
        });
        assert!(
            Settings::from_config(c).unwrap().filter.is_none(),
            "an open filter is none"
        );
    }

    #[test]
    fn parses_json_from_the_operator() {
        let json = serde_json::to_string(&config()).unwrap();
        assert!(json.contains("\"sinkUrl\""), "{json}");
        let s = Settings::from_json(&json).unwrap();
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert_eq!(s.backoff.len(), 3);
        assert_eq!(s.sink_url.as_str(), "http://127.0.0.1:8080/hook");
        let mut c = config();
        c.sink_url = "http://Sink.Example:80".into();
        let s = Settings::from_config(c).unwrap();
        assert_eq!(s.sink_url.as_str(), "http://sink.example/");
        assert_eq!(
            s.sink_url_text, "http://Sink.Example:80",
            "kept as configured"
        );
    }

    #[test]
    fn backoff_repeats_the_last_entry() {
        let s = Settings::from_config(config()).unwrap();
        assert_eq!(s.backoff_after(1), Duration::from_secs(1));
        assert_eq!(s.backoff_after(2), Duration::from_secs(5));
        assert_eq!(s.backoff_after(3), Duration::from_secs(30));
        assert_eq!(s.backoff_after(9), Duration::from_secs(30));
        assert_eq!(s.backoff_after(0), Duration::from_secs(1));
        assert_eq!(backoff_after(&[], 3), DEFAULT_BACKOFF);
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let mut c = config();
        c.timeout = GoDuration::default();
        let e = Settings::from_config(c).unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
        let mut json = serde_json::to_value(config()).unwrap();
        json["timeout"] = "soon".into();
        let e = Settings::from_json(&json.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("timeout") && e.contains("Go-style duration"),
            "{e}"
        );
        let mut c = config();
        c.sink_url = "/relative".into();
        assert!(
            Settings::from_config(c)
                .unwrap_err()
                .to_string()
                .contains("sinkUrl")
        );
        let mut c = config();
        c.sink_url = "ftp://x/".into();
        assert!(Settings::from_config(c).is_err());
        let mut c = config();
        c.concurrency_per_replica = 0;
        assert!(Settings::from_config(c).is_err());
        let mut c = config();
        c.consumers.clear();
        assert!(Settings::from_config(c).is_err());
        assert!(matches!(
            Settings::from_json("{"),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn rate_is_split_like_concurrency_and_never_exceeded_in_total() {
        let per_sec = |r: RateShare| 1.0 / r.interval.as_secs_f64();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(per_sec(split_rate(100, 10, 10)), 100.0));
        assert_eq!(split_rate(100, 10, 10).burst.get(), 100);
        assert!(close(per_sec(split_rate(100, 4, 10)), 40.0));
        // 3 pods of 1 slot with concurrency 3 and 10/s: 3.33/s each, 10 in
        // total (rounding up gave 4 each, 12/s).
        assert!(close(per_sec(split_rate(10, 1, 3)), 10.0 / 3.0));
        assert_eq!(split_rate(10, 1, 3).burst.get(), 3);
        // 100 pods of 1 slot sharing 1/s: one delivery per 100 s each.
        assert_eq!(split_rate(1, 1, 100).interval, Duration::from_secs(100));
        assert_eq!(split_rate(1, 1, 100).burst.get(), 1);
        for (rate, per, conc) in [(10, 1, 10), (7, 2, 9), (1000, 3, 10), (5, 5, 5)] {
            let pods = conc / per;
            let total = f64::from(pods) * per_sec(split_rate(rate, per, conc));
            assert!(
                total <= f64::from(rate) + 1e-6,
                "{rate} {per} {conc}: {total}"
            );
        }
        let mut c = config();
        c.rate_limit_per_second = Some(50);
        let s = Settings::from_config(c.clone()).unwrap();
        assert!(close(per_sec(s.rate_share.unwrap()), 20.0));
        // Every pod may use the whole cap, but the rate is split over the
        // most pods that run.
        c.concurrency_per_replica = 10;
        c.max_replicas = 3;
        c.rate_limit_per_second = Some(30);
        let s = Settings::from_config(c).unwrap();
        assert!(close(per_sec(s.rate_share.unwrap()), 10.0));
    }
}
