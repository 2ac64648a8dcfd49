//! Prometheus metrics of the delivery loop.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `spillway_processor_deliveries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `acked`, `retried`, `dead_lettered`, `dropped` or `abandoned`.
    pub outcome: &'static str,
    /// `2xx`..`5xx`, `timeout` or `error`.
    pub status_class: &'static str,
}

/// Labels of `spillway_processor_dead_lettered_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `max_attempts`, `client_error` or `gone`.
    pub reason: &'static str,
}

/// Labels of `spillway_processor_notices_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoticeLabels {
    /// `sink_gone` or `sink_ok`.
    pub kind: &'static str,
}

/// Labels of `spillway_processor_attempt_records_failed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordFailureLabels {
    /// `queue_full` (deliveries outpaced recording) or `publish` (JetStream
    /// did not confirm the record).
    pub reason: &'static str,
}

/// Labels of `spillway_processor_filtered_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilteredLabels {
    /// `event_type`, `expression` (false) or `error` (the expression
    /// failed on the webhook).
    pub reason: &'static str,
}

/// Every metric the processor exports.
#[derive(Debug)]
pub struct Metrics {
    /// Delivery attempts by outcome and status class.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Time from request start to complete response.
    pub latency: Histogram,
    /// Deliveries in flight to the sink right now.
    pub in_flight: Gauge,
    /// Retries scheduled (negative acknowledgements with delay).
    pub retries: Counter,
    /// Messages dead-lettered, by reason.
    pub dead_lettered: Family<ReasonLabels, Counter>,
    /// Messages given up on while dead letters are disabled.
    pub dropped: Counter,
    /// Deliveries answered 410 Gone (the sink says it no longer exists).
    pub sink_gone: Counter,
    /// Sink notices sent to the operator, by kind.
    pub notices: Family<NoticeLabels, Counter>,
    /// Failed dead-letter publishes (the message is retried instead).
    pub dead_letter_publish_failures: Counter,
    /// Failed acknowledgements to JetStream (the message may be redelivered).
    pub ack_failures: Counter,
    /// Retries that could not be parked (they waited on their consumer).
    pub park_failures: Counter,
    /// Parked retries moved back to the main stream when due.
    pub retries_moved: Counter,
    /// Due retries the main stream refused for now (kept, tried again).
    pub retry_move_failures: Counter,
    /// Attempt records stored.
    pub attempt_records: Counter,
    /// Attempt records lost (the deliveries went on), by reason.
    pub attempt_record_failures: Family<RecordFailureLabels, Counter>,
    /// Webhooks this listener's filter did not select (acknowledged, never
    /// delivered), by reason.
    pub filtered: Family<FilteredLabels, Counter>,
}

impl Metrics {
    /// Create the metrics and register them.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            deliveries: Family::default(),
            latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            in_flight: Gauge::default(),
            retries: Counter::default(),
            dead_lettered: Family::default(),
            dropped: Counter::default(),
            sink_gone: Counter::default(),
            notices: Family::default(),
            dead_letter_publish_failures: Counter::default(),
            ack_failures: Counter::default(),
            park_failures: Counter::default(),
            retries_moved: Counter::default(),
            retry_move_failures: Counter::default(),
            attempt_records: Counter::default(),
            attempt_record_failures: Family::default(),
            filtered: Family::default(),
        };
        spillway_api::metrics::register_build_info(registry, "processor");
        let r = registry.sub_registry_with_prefix("spillway_processor");
        r.register(
            "deliveries",
            "Delivery attempts by outcome and status class",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_duration_seconds",
            "Duration of delivery attempts to the sink",
            m.latency.clone(),
        );
        r.register(
            "in_flight",
            "Deliveries in flight to the sink",
            m.in_flight.clone(),
        );
        r.register(
            "retries",
            "Retries scheduled after failed attempts",
            m.retries.clone(),
        );
        r.register(
            "dead_lettered",
            "Messages dead-lettered, by reason",
            m.dead_lettered.clone(),
        );
        r.register(
            "dropped",
            "Messages given up on with dead letters disabled",
            m.dropped.clone(),
        );
        r.register(
            "sink_gone",
            "Deliveries answered 410 Gone by the sink",
            m.sink_gone.clone(),
        );
        r.register(
            "notices",
            "Sink notices (sink_gone, sink_ok) sent to the operator",
            m.notices.clone(),
        );
        r.register(
            "dead_letter_publish_failures",
            "Dead-letter publishes that failed (the message is retried)",
            m.dead_letter_publish_failures.clone(),
        );
        r.register(
            "ack_failures",
            "Acknowledgements JetStream did not confirm",
            m.ack_failures.clone(),
        );
        r.register(
            "park_failures",
            "Retries the retry stream refused (they waited on their consumer, holding a slot)",
            m.park_failures.clone(),
        );
        r.register(
            "retries_moved",
            "Parked retries moved back to the main stream when due",
            m.retries_moved.clone(),
        );
        r.register(
            "retry_move_failures",
            "Due retries the main stream refused for now (kept and tried again)",
            m.retry_move_failures.clone(),
        );
        r.register(
            "attempt_records",
            "Delivery attempts recorded in the attempt stream",
            m.attempt_records.clone(),
        );
        r.register(
            "attempt_records_failed",
            "Attempt records lost, by reason (deliveries never wait for records)",
            m.attempt_record_failures.clone(),
        );
        r.register(
            "filtered",
            "Webhooks the listener's eventTypes or filter did not select (acknowledged, not delivered), by reason",
            m.filtered.clone(),
        );
        m
    }

    /// Count one delivery attempt.
    pub fn delivery(&self, outcome: &'static str, status_class: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                outcome,
                status_class,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix_and_labels() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.delivery("acked", "2xx");
        m.dead_lettered
            .get_or_create(&ReasonLabels { reason: "gone" })
            .inc();
        m.latency.observe(0.02);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains(
                r#"spillway_processor_deliveries_total{outcome="acked",status_class="2xx"} 1"#
            ),
            "{out}"
        );
        assert!(out.contains(r#"spillway_processor_dead_lettered_total{reason="gone"} 1"#));
        assert!(out.contains("spillway_processor_delivery_duration_seconds_count 1"));
        assert!(out.contains("spillway_processor_in_flight 0"));
    }
}
