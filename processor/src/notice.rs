//! Sink notices: tell the operator (through core NATS; processors have no
//! Kubernetes API access) that the sink answered 410 Gone, and that it
//! recovered. The operator turns them into the endpoint's `SinkAvailable`
//! condition and an Event.
//!
//! Rate-limited per pod: at most one `sink_gone` per [`GONE_INTERVAL`]
//! while 410s continue, and one `sink_ok` on the first 2xx after a reported
//! `sink_gone`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_api::names::EndpointNames;
use spillway_api::wire::{NoticeKind, SinkNotice, redact_url};

use crate::metrics::{Metrics, NoticeLabels};

/// Least time between two `sink_gone` notices of one pod.
pub const GONE_INTERVAL: Duration = Duration::from_secs(30);

/// Longest a notice publish may wait (e.g. while NATS is unreachable and the
/// client's buffer is full) before it is given up.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides which delivery results are worth a notice.
#[derive(Debug, Clone)]
pub struct NoticeGate {
    interval: Duration,
    last_gone: Option<Instant>,
    reported: bool,
}

impl NoticeGate {
    /// A gate sending at most one `sink_gone` per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_gone: None,
            reported: false,
        }
    }

    /// The notice to send, if any, after the sink answered `status` at
    /// `now` (`None` for no response).
    pub fn on_result(&mut self, status: Option<u16>, now: Instant) -> Option<NoticeKind> {
        match status? {
            410 => {
                let due = self
                    .last_gone
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
                if due {
                    self.last_gone = Some(now);
                    self.reported = true;
                    Some(NoticeKind::SinkGone)
                } else {
                    None
                }
            }
            200..=299 if self.reported => {
                self.reported = false;
                Some(NoticeKind::SinkOk)
            }
            _ => None,
        }
    }
}

/// Publishes notices for one endpoint.
#[derive(Debug)]
pub struct Notifier {
    client: async_nats::Client,
    subject: String,
    endpoint: String,
    pod: String,
    sink: String,
    gate: Mutex<NoticeGate>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// Notices for `endpoint` (`namespace/name`) about `sink_url`, sent as
    /// `pod`.
    pub fn new(
        client: async_nats::Client,
        endpoint: &str,
        sink_url: &str,
        pod: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (ns, name) = endpoint.split_once('/').unwrap_or(("", endpoint));
        Self {
            client,
            subject: EndpointNames::new(ns, name).notice_subject(),
            endpoint: endpoint.to_owned(),
            pod,
            sink: redact_url(sink_url),
            gate: Mutex::new(NoticeGate::new(GONE_INTERVAL)),
            metrics,
        }
    }

    /// The notice for a delivery answered with `status`, if one is due.
    pub fn notice_for(&self, status: Option<u16>) -> Option<SinkNotice> {
        let kind = self
            .gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_result(status, Instant::now())?;
        Some(SinkNotice {
            kind,
            endpoint: self.endpoint.clone(),
            status: status.unwrap_or_default(),
            at: jiff::Timestamp::now().to_string(),
            pod: self.pod.clone(),
            sink: self.sink.clone(),
        })
    }

    /// Send a notice if one is due, in the background: delivery never waits
    /// for it, and a lost notice is only a late status (the next one
    /// follows within [`GONE_INTERVAL`] while the sink stays gone).
    pub fn observe(&self, status: Option<u16>) {
        let Some(notice) = self.notice_for(status) else {
            return;
        };
        let payload = match serde_json::to_vec(&notice) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode sink notice");
                return;
            }
        };
        let client = self.client.clone();
        let subject = self.subject.clone();
        let metrics = self.metrics.clone();
        let kind = notice.kind.as_str();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(
                PUBLISH_TIMEOUT,
                client.publish(subject.clone(), payload.into()),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    metrics.notices.get_or_create(&NoticeLabels { kind }).inc();
                    tracing::info!(%subject, kind, "sink notice sent to the operator");
                }
                Ok(Err(e)) => tracing::warn!(%subject, kind, error = %e, "sink notice not sent"),
                Err(_) => tracing::warn!(%subject, kind, "sink notice not sent: NATS too slow"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gone_is_reported_at_most_once_per_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = NoticeGate::new(s(30));
        assert_eq!(g.on_result(Some(410), t0), Some(NoticeKind::SinkGone));
        assert_eq!(g.on_result(Some(410), t0 + s(1)), None);
        assert_eq!(g.on_result(Some(410), t0 + s(29)), None);
        assert_eq!(
            g.on_result(Some(410), t0 + s(30)),
            Some(NoticeKind::SinkGone)
        );
        assert_eq!(g.on_result(Some(410), t0 + s(31)), None);
    }

    #[test]
    fn ok_follows_only_a_reported_gone_and_only_once() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = NoticeGate::new(s(30));
        // 2xx without a gone before: nothing to report.
        assert_eq!(g.on_result(Some(200), t0), None);
        assert_eq!(g.on_result(Some(410), t0), Some(NoticeKind::SinkGone));
        // Other failures neither report nor clear.
        for other in [None, Some(500), Some(404), Some(429)] {
            assert_eq!(g.on_result(other, t0 + s(1)), None, "{other:?}");
        }
        assert_eq!(g.on_result(Some(204), t0 + s(2)), Some(NoticeKind::SinkOk));
        assert_eq!(g.on_result(Some(200), t0 + s(3)), None);
        // A flapping sink: the next gone still waits for the interval, so a
        // pod sends at most one gone and one ok per interval.
        assert_eq!(g.on_result(Some(410), t0 + s(4)), None);
        assert_eq!(g.on_result(Some(200), t0 + s(5)), None);
        assert_eq!(
            g.on_result(Some(410), t0 + s(30)),
            Some(NoticeKind::SinkGone)
        );
        assert_eq!(g.on_result(Some(200), t0 + s(31)), Some(NoticeKind::SinkOk));
    }

    #[tokio::test]
    async fn notices_carry_no_userinfo_or_query() {
        // Not connected: only the notice's content is checked here.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let n = Notifier::new(
            client,
            "team/gh.v2",
            "https://u:secret@sink.example/hooks?token=s3cr3t",
            "gh-processor-1".into(),
            Arc::new(Metrics::new(&mut reg)),
        );
        assert_eq!(n.subject, "spillway.notice.team_gh_v2");
        assert!(n.notice_for(Some(500)).is_none());
        let notice = n.notice_for(Some(410)).unwrap();
        assert_eq!(notice.kind, NoticeKind::SinkGone);
        assert_eq!(notice.status, 410);
        assert_eq!(notice.endpoint, "team/gh.v2");
        assert_eq!(notice.pod, "gh-processor-1");
        assert_eq!(notice.sink, "https://sink.example/hooks");
        let json = serde_json::to_string(&notice).unwrap();
        assert!(
            !json.contains("secret") && !json.contains("s3cr3t"),
            "{json}"
        );
        assert!(n.notice_for(Some(410)).is_none(), "rate-limited");
    }
}
