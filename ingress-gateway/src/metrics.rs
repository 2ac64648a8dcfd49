//! Prometheus metrics of the gateway. Labels never carry secrets or request
//! paths that are not configured (unknown paths count as
//! `webhook_endpoint=""`). The label is not `endpoint`: Prometheus
//! Operator sets its own `endpoint` target label (the port name), which
//! would rename ours to `exported_endpoint`.

use std::collections::HashSet;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use spillway_api::signature::Failure;

use crate::route::Table;

/// Labels of the request counter. The endpoint is shared with its route
/// (`Route::label`), so counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name`, or empty for unknown paths.
    pub webhook_endpoint: Arc<String>,
    /// HTTP status answered.
    pub status: u16,
}

/// Labels of the verification-failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    /// `namespace/name`.
    pub webhook_endpoint: Arc<String>,
    /// `missing_signature`, `bad_signature` or `timestamp_out_of_tolerance`.
    pub reason: String,
}

/// Labels of per-endpoint metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `namespace/name`.
    pub webhook_endpoint: Arc<String>,
}

/// Labels of the file-source reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` (a changed file was loaded) or `failed` (the changed file
    /// was invalid; the previous routing table stays).
    pub result: String,
}

/// All gateway metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by endpoint and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Verification failures by endpoint and reason.
    pub verify_failures: Family<VerifyLabels, Counter>,
    /// Time from publish to PubAck, seconds.
    pub publish_seconds: Family<EndpointLabels, Histogram>,
    /// Publishes JetStream reported as duplicates.
    pub duplicates: Family<EndpointLabels, Counter>,
    /// Publishes that failed or timed out.
    pub publish_failures: Family<EndpointLabels, Counter>,
    /// Requests being handled.
    pub in_flight: Gauge,
    /// Routes in the table.
    pub routes: Gauge,
    /// Reloads of the file source, by result.
    pub file_reloads: Family<ReloadLabels, Counter>,
    /// The label of requests to unknown paths (`""`).
    pub unknown_endpoint: Arc<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let mut root = Registry::default();
        spillway_api::metrics::register_build_info(&mut root, "gateway");
        let registry = root.sub_registry_with_prefix("spillway_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let verify_failures = Family::<VerifyLabels, Counter>::default();
        let publish_seconds = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        let duplicates = Family::<EndpointLabels, Counter>::default();
        let publish_failures = Family::<EndpointLabels, Counter>::default();
        let in_flight = Gauge::default();
        let routes = Gauge::default();
        let file_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        registry.register(
            "verify_failures",
            "Requests that failed verification, by endpoint and reason",
            verify_failures.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from JetStream publish to PubAck",
            publish_seconds.clone(),
        );
        registry.register(
            "publish_duplicates",
            "Publishes JetStream deduplicated",
            duplicates.clone(),
        );
        registry.register(
            "publish_failures",
            "Publishes that failed or timed out (answered 503)",
            publish_failures.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being handled",
            in_flight.clone(),
        );
        registry.register("routes", "Paths in the routing table", routes.clone());
        registry.register(
            "file_reloads",
            "Changes of the endpoints or secret files seen by the file source, by result",
            file_reloads.clone(),
        );
        Self {
            registry: root,
            requests,
            verify_failures,
            publish_seconds,
            duplicates,
            publish_failures,
            in_flight,
            routes,
            file_reloads,
            unknown_endpoint: Arc::default(),
        }
    }

    /// Remove the series of the endpoints `before` served and `after` does
    /// not (deleted, or lost a path conflict): endpoints coming and going
    /// must not grow the gateway's series until it restarts.
    pub fn forget_removed(&self, before: &Table, after: &Table) {
        let kept: HashSet<&str> = after.paths().map(|(_, e)| e).collect();
        for (_, gone) in before.paths().filter(|(_, e)| !kept.contains(e)) {
            self.forget(gone);
        }
    }

    /// Remove every series labelled `endpoint`.
    fn forget(&self, endpoint: &str) {
        let label = Arc::new(endpoint.to_owned());
        for status in 100..=599 {
            self.requests.remove(&RequestLabels {
                webhook_endpoint: label.clone(),
                status,
            });
        }
        for f in Failure::ALL {
            self.verify_failures.remove(&VerifyLabels {
                webhook_endpoint: label.clone(),
                reason: f.reason().to_owned(),
            });
        }
        let e = EndpointLabels {
            webhook_endpoint: label,
        };
        self.publish_seconds.remove(&e);
        self.duplicates.remove(&e);
        self.publish_failures.remove(&e);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{EndpointDef, Router};

    fn def(name: &str) -> EndpointDef {
        EndpointDef {
            namespace: "team".into(),
            name: name.into(),
            created: Some(1),
            spec: serde_saphyr::from_str(&format!(
                "path: /{name}\nverification: {{scheme: none}}\nprocessor: {{sink: {{url: \"http://sink\"}}}}\n"
            ))
            .unwrap(),
            partitions_ready: None,
                        stored_format: spillway_api::stored::CURRENT,
        }
    }

    #[test]
    fn a_removed_endpoint_leaves_no_series() {
        let m = Metrics::new();
        let router = Router::default();
        let none = |_: &str, _: &spillway_api::SecretKeyRef| None;
        router.rebuild(&[def("a"), def("b")], &none, None);
        for name in ["team/a", "team/b"] {
            let label = Arc::new(name.to_owned());
            for status in [202, 401, 503] {
                m.requests
                    .get_or_create(&RequestLabels {
                        webhook_endpoint: label.clone(),
                        status,
                    })
                    .inc();
            }
            m.verify_failures
                .get_or_create(&VerifyLabels {
                    webhook_endpoint: label.clone(),
                    reason: Failure::BadSignature.reason().into(),
                })
                .inc();
            let e = EndpointLabels {
                webhook_endpoint: label,
            };
            m.publish_seconds.get_or_create(&e).observe(0.01);
            m.duplicates.get_or_create(&e).inc();
            m.publish_failures.get_or_create(&e).inc();
        }
        let before = router.table();
        router.rebuild(&[def("b")], &none, None);
        m.forget_removed(&before, &router.table());
        let text = m.encode();
        assert!(!text.contains(r#"webhook_endpoint="team/a""#), "{text}");
        for series in [
            r#"spillway_gateway_requests_total{webhook_endpoint="team/b",status="503"} 1"#,
            r#"spillway_gateway_verify_failures_total{webhook_endpoint="team/b",reason="bad_signature"} 1"#,
            r#"spillway_gateway_publish_duplicates_total{webhook_endpoint="team/b"} 1"#,
            r#"spillway_gateway_publish_failures_total{webhook_endpoint="team/b"} 1"#,
            r#"spillway_gateway_publish_duration_seconds_count{webhook_endpoint="team/b"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing in\n{text}");
        }
    }
}
