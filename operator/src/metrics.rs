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

/// The operator's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    duration: Histogram,
    endpoints: Family<Labels, Gauge>,
    status_writes: Counter,
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
        let mut registry = Registry::with_prefix("spillway_operator");
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
        Self {
            registry,
            reconciles,
            errors,
            duration,
            endpoints,
            status_writes,
            conditions: Mutex::default(),
        }
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
}
