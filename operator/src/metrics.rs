//! Prometheus metrics of the operator.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The per-endpoint gauges.
#[derive(Default)]
struct PerEndpoint {
    ready: Family<Labels, Gauge>,
    backlog: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    retrying: Family<Labels, Gauge>,
    dead_letters: Family<Labels, Gauge>,
    oldest_seconds: Family<Labels, Gauge>,
    stream_fill_percent: Family<Labels, Gauge>,
}

impl PerEndpoint {
    /// Set one object's series from `state`; `None` removes them.
    fn set(&self, labels: &Labels, state: Option<EndpointState>) {
        let families = [
            &self.ready,
            &self.backlog,
            &self.in_flight,
            &self.retrying,
            &self.dead_letters,
            &self.oldest_seconds,
            &self.stream_fill_percent,
        ];
        let Some(s) = state else {
            for f in families {
                f.remove(labels);
            }
            return;
        };
        self.ready.get_or_create(labels).set(i64::from(s.ready));
        if let Some(b) = s.synced {
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.backlog.get_or_create(labels).set(n(b.backlog));
            self.in_flight.get_or_create(labels).set(n(b.in_flight));
            self.retrying.get_or_create(labels).set(n(b.retrying));
            self.dead_letters
                .get_or_create(labels)
                .set(n(b.dead_letters));
            self.oldest_seconds
                .get_or_create(labels)
                .set(n(b.oldest_seconds));
            self.stream_fill_percent
                .get_or_create(labels)
                .set(n(b.stream_fill_percent));
        }
    }
}

/// One endpoint's state for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointState {
    /// Ready=True.
    pub ready: bool,
    /// What the last successful JetStream sync read (kept as it was when
    /// a sync fails).
    pub synced: Option<SyncedCounts>,
}

/// Counts a JetStream sync read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncedCounts {
    /// Not yet handed out.
    pub backlog: u64,
    /// Handed out, not acknowledged.
    pub in_flight: u64,
    /// Parked retries.
    pub retrying: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Age of the oldest webhook held, seconds.
    pub oldest_seconds: u64,
    /// How full the work stream is, percent of its tighter limit.
    pub stream_fill_percent: u64,
}

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    duration: Histogram,
    endpoints: Family<Labels, Gauge>,
    status_writes: Counter,
    /// Per endpoint (`webhook_endpoint="namespace/name"`): what the last
    /// sync read from JetStream, and whether it is Ready.
    per_endpoint: PerEndpoint,
    /// Per WebhookListener (`webhook_listener="namespace/name"` and its
    /// `webhook_endpoint`); its oldest-age and stream-fill families are not
    /// registered (the endpoint's series say those).
    per_listener: PerEndpoint,
    /// Last known condition statuses per endpoint (`namespace/name`).
    conditions: Mutex<HashMap<String, Vec<(String, String)>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("spillway_operator");
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles run, by result",
            reconciles.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors, by reason",
            errors.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile takes",
            duration.clone(),
        );
        let endpoints = Family::<Labels, Gauge>::default();
        registry.register(
            "endpoints",
            "WebhookEndpoints by condition and status",
            endpoints.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "Status patches written",
            status_writes.clone(),
        );
        let per_endpoint = PerEndpoint::default();
        for (name, help, family) in [
            (
                "endpoint_ready",
                "1 when the WebhookEndpoint is Ready, else 0",
                &per_endpoint.ready,
            ),
            (
                "endpoint_backlog",
                "Webhooks stored and not yet handed to a processor",
                &per_endpoint.backlog,
            ),
            (
                "endpoint_in_flight",
                "Webhooks handed to a processor and not yet acknowledged",
                &per_endpoint.in_flight,
            ),
            (
                "endpoint_retrying",
                "Failed deliveries waiting out their retry delay",
                &per_endpoint.retrying,
            ),
            (
                "endpoint_dead_letters",
                "Webhooks in the dead-letter stream",
                &per_endpoint.dead_letters,
            ),
            (
                "endpoint_oldest_undelivered_seconds",
                "Age of the oldest webhook the work stream holds (0 when it holds none)",
                &per_endpoint.oldest_seconds,
            ),
            (
                "endpoint_stream_fill_percent",
                "How full the work stream is: percent of the tighter of stream.maxBytes and stream.maxMessages (0 when unlimited); at 100 the gateway answers 503",
                &per_endpoint.stream_fill_percent,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        let per_listener = PerEndpoint::default();
        for (name, help, family) in [
            (
                "listener_ready",
                "1 when the WebhookListener is Ready, else 0",
                &per_listener.ready,
            ),
            (
                "listener_backlog",
                "Webhooks offered to the listener and not yet handed to its processor",
                &per_listener.backlog,
            ),
            (
                "listener_in_flight",
                "Webhooks handed to the listener's processor and not yet acknowledged",
                &per_listener.in_flight,
            ),
            (
                "listener_retrying",
                "The listener's failed deliveries waiting out their retry delay",
                &per_listener.retrying,
            ),
            (
                "listener_dead_letters",
                "The listener's webhooks in the endpoint's dead-letter stream",
                &per_listener.dead_letters,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        spillway_api::metrics::register_build_info(&mut root, "operator");
        Self {
            per_listener,
            registry: root,
            reconciles,
            errors,
            duration,
            endpoints,
            status_writes,
            per_endpoint,
            conditions: Mutex::default(),
        }
    }

    /// Record what the last sync of `key` (`namespace/name`) read; `None`
    /// removes the endpoint's series (it is gone).
    pub fn set_endpoint(&self, key: &str, state: Option<EndpointState>) {
        let labels = vec![("webhook_endpoint".to_owned(), key.to_owned())];
        self.per_endpoint.set(&labels, state);
    }

    /// Record what the last sync of listener `key` (`namespace/name`) on
    /// `endpoint` read; `None` removes its series.
    pub fn set_listener(&self, key: &str, endpoint: &str, state: Option<EndpointState>) {
        let labels = vec![
            ("webhook_endpoint".to_owned(), endpoint.to_owned()),
            ("webhook_listener".to_owned(), key.to_owned()),
        ];
        self.per_listener.set(&labels, state);
    }

    /// Count a finished reconcile.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Count an error by reason.
    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Count a status write.
    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    /// Status writes so far.
    pub fn status_writes(&self) -> u64 {
        self.status_writes.get()
    }

    /// Record an endpoint's conditions (`None` when it is gone).
    pub fn set_conditions(&self, key: &str, conditions: Option<Vec<(String, String)>>) {
        let mut map = self.conditions.lock().unwrap_or_else(|e| e.into_inner());
        match conditions {
            Some(c) => {
                map.insert(key.to_owned(), c);
            }
            None => {
                map.remove(key);
            }
        }
        let mut counts: HashMap<(String, String), i64> = HashMap::new();
        for conds in map.values() {
            for (t, s) in conds {
                *counts.entry((t.clone(), s.clone())).or_default() += 1;
            }
        }
        self.endpoints.clear();
        for ((t, s), n) in counts {
            self.endpoints
                .get_or_create(&vec![("condition".into(), t), ("status".into(), s)])
                .set(n);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_condition_are_counted() {
        let m = Metrics::new();
        let ready = |s: &str| Some(vec![("Ready".to_owned(), s.to_owned())]);
        m.set_conditions("a/x", ready("True"));
        m.set_conditions("a/y", ready("True"));
        m.set_conditions("a/z", ready("False"));
        m.reconciled(true, Duration::from_millis(3));
        m.error("NatsUnavailable");
        let text = m.render();
        assert!(
            text.contains(r#"spillway_operator_endpoints{condition="Ready",status="True"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"spillway_operator_reconcile_errors_total{reason="NatsUnavailable"} 1"#
            )
        );
        m.set_conditions("a/z", None);
        assert!(!m.render().contains(r#"status="False""#));
    }

    #[test]
    fn each_endpoint_has_its_gauges_until_it_is_gone() {
        let m = Metrics::new();
        m.set_endpoint(
            "team/gh",
            Some(EndpointState {
                ready: true,
                synced: Some(SyncedCounts {
                    backlog: 12,
                    in_flight: 3,
                    retrying: 2,
                    dead_letters: 1,
                    oldest_seconds: 95,
                    stream_fill_percent: 42,
                }),
            }),
        );
        let text = m.render();
        for want in [
            r#"spillway_operator_endpoint_ready{webhook_endpoint="team/gh"} 1"#,
            r#"spillway_operator_endpoint_backlog{webhook_endpoint="team/gh"} 12"#,
            r#"spillway_operator_endpoint_in_flight{webhook_endpoint="team/gh"} 3"#,
            r#"spillway_operator_endpoint_retrying{webhook_endpoint="team/gh"} 2"#,
            r#"spillway_operator_endpoint_dead_letters{webhook_endpoint="team/gh"} 1"#,
            r#"spillway_operator_endpoint_oldest_undelivered_seconds{webhook_endpoint="team/gh"} 95"#,
            r#"spillway_operator_endpoint_stream_fill_percent{webhook_endpoint="team/gh"} 42"#,
            r#"spillway_build_info{component="operator",version=""#,
        ] {
            assert!(text.contains(want), "{want} missing in\n{text}");
        }
        // A failed sync keeps the last counts, updates readiness.
        m.set_endpoint(
            "team/gh",
            Some(EndpointState {
                ready: false,
                synced: None,
            }),
        );
        let text = m.render();
        assert!(text.contains(r#"spillway_operator_endpoint_ready{webhook_endpoint="team/gh"} 0"#));
        assert!(
            text.contains(r#"spillway_operator_endpoint_backlog{webhook_endpoint="team/gh"} 12"#)
        );
        m.set_endpoint("team/gh", None);
        assert!(!m.render().contains("team/gh"));
    }
}
