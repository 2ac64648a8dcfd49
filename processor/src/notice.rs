//! Sink notices: tell the operator (through core NATS; processors have no
//! Kubernetes API access) that the sink answered 410 Gone, and that it
//! recovered. The operator turns them into the endpoint's `SinkAvailable`
//! condition and an Event.
//!
//! Rate-limited per pod: at most one `sink_gone` per [`GONE_INTERVAL`]
//! while 410s continue. Every pod of the endpoint also follows the notices
//! on the endpoint's subject: a `sink_gone` from any pod (or its own) arms
//! it to send one `sink_ok` on its next 2xx, and a `sink_ok` from any pod
//! disarms it. So whichever replica first delivers again clears the
//! endpoint's condition, and roughly one `sink_ok` goes out per recovery.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
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
    /// A `sink_gone` (this pod's or another's) is not yet answered by a
    /// `sink_ok`: the next 2xx sends one.
    armed: bool,
}

impl NoticeGate {
    /// A gate sending at most one `sink_gone` per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_gone: None,
            armed: false,
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
                    self.armed = true;
                    Some(NoticeKind::SinkGone)
                } else {
                    None
                }
            }
            200..=299 if self.armed => {
                self.armed = false;
                Some(NoticeKind::SinkOk)
            }
            _ => None,
        }
    }

    /// Another pod of the endpoint sent `kind`: a `sink_gone` arms this pod
    /// to send `sink_ok` on its next 2xx, a `sink_ok` disarms it (the
    /// operator already heard of the recovery). Whether that changed the
    /// gate; this pod's own `sink_gone` rate limit is unaffected.
    pub fn on_notice(&mut self, kind: NoticeKind) -> bool {
        let was = self.armed;
        self.armed = kind == NoticeKind::SinkGone;
        was != self.armed
    }

    /// Whether the next 2xx sends `sink_ok`.
    pub fn armed(&self) -> bool {
        self.armed
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
    gate: Arc<Mutex<NoticeGate>>,
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
            gate: Arc::new(Mutex::new(NoticeGate::new(GONE_INTERVAL))),
            metrics,
        }
    }

    /// The notice for a delivery answered with `status`, if one is due.
    pub fn notice_for(&self, status: Option<u16>) -> Option<SinkNotice> {
        let kind = lock(&self.gate).on_result(status, Instant::now())?;
        Some(SinkNotice {
            kind,
            endpoint: self.endpoint.clone(),
            status: status.unwrap_or_default(),
            at: jiff::Timestamp::now().to_string(),
            pod: self.pod.clone(),
            sink: self.sink.clone(),
        })
    }

    /// Take in a notice seen on the endpoint's subject: another pod's
    /// notice about this endpoint arms or disarms this pod's `sink_ok`
    /// ([`NoticeGate::on_notice`]); this pod's own (the subscription hears
    /// its own publishes) and anything else are ignored. Whether the
    /// notice changed what this pod will send.
    pub fn heard(&self, payload: &[u8]) -> bool {
        heard(&self.gate, &self.endpoint, &self.pod, payload)
    }

    /// Follow the other pods' notices on this endpoint's subject (core
    /// NATS; the client resubscribes after reconnects) until the returned
    /// task is aborted. A failed subscription is logged and only costs the
    /// cross-pod `sink_ok`: deliveries and readiness do not depend on it.
    pub fn follow(&self) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        let subject = self.subject.clone();
        let gate = self.gate.clone();
        let endpoint = self.endpoint.clone();
        let pod = self.pod.clone();
        tokio::spawn(async move {
            let mut sub = match client.subscribe(subject.clone()).await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(%subject, error = %e,
                        "cannot follow other pods' sink notices; this pod sends sink_ok only after its own sink_gone");
                    return;
                }
            };
            tracing::debug!(%subject, "following sink notices");
            while let Some(msg) = sub.next().await {
                heard(&gate, &endpoint, &pod, &msg.payload);
            }
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

fn lock(gate: &Mutex<NoticeGate>) -> std::sync::MutexGuard<'_, NoticeGate> {
    gate.lock().unwrap_or_else(|e| e.into_inner())
}

/// See [`Notifier::heard`].
fn heard(gate: &Mutex<NoticeGate>, endpoint: &str, pod: &str, payload: &[u8]) -> bool {
    let notice: SinkNotice = match serde_json::from_slice(payload) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring a malformed sink notice");
            return false;
        }
    };
    if notice.pod == pod || notice.endpoint != endpoint {
        return false;
    }
    let changed = lock(gate).on_notice(notice.kind);
    if changed {
        tracing::info!(
            from = %notice.pod,
            kind = notice.kind.as_str(),
            "another pod reported the sink: {}",
            match notice.kind {
                NoticeKind::SinkGone => "the next successful delivery sends sink_ok",
                NoticeKind::SinkOk => "no sink_ok needed from this pod",
            }
        );
    }
    changed
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

    #[test]
    fn any_pods_gone_arms_one_ok_and_any_pods_ok_disarms() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = NoticeGate::new(s(30));
        // Another pod's gone: this pod's next 2xx (only) reports recovery.
        assert!(g.on_notice(NoticeKind::SinkGone));
        assert!(g.armed());
        assert!(!g.on_notice(NoticeKind::SinkGone), "already armed");
        for other in [None, Some(500), Some(404), Some(429)] {
            assert_eq!(g.on_result(other, t0), None, "{other:?}");
        }
        assert_eq!(g.on_result(Some(200), t0), Some(NoticeKind::SinkOk));
        assert_eq!(g.on_result(Some(200), t0), None);
        assert!(!g.armed());

        // Another pod's ok first: nothing left to report here.
        g.on_notice(NoticeKind::SinkGone);
        assert!(g.on_notice(NoticeKind::SinkOk));
        assert_eq!(g.on_result(Some(200), t0), None);
        assert!(!g.on_notice(NoticeKind::SinkOk), "already disarmed");

        // This pod's own gone, then another pod's ok: disarmed too.
        assert_eq!(g.on_result(Some(410), t0), Some(NoticeKind::SinkGone));
        g.on_notice(NoticeKind::SinkOk);
        assert_eq!(g.on_result(Some(204), t0 + s(1)), None);

        // Others' notices leave this pod's gone rate limit alone.
        g.on_notice(NoticeKind::SinkGone);
        assert_eq!(g.on_result(Some(410), t0 + s(2)), None, "rate-limited");
        assert_eq!(
            g.on_result(Some(410), t0 + s(30)),
            Some(NoticeKind::SinkGone)
        );
        let mut fresh = NoticeGate::new(s(30));
        fresh.on_notice(NoticeKind::SinkGone);
        assert_eq!(
            fresh.on_result(Some(410), t0),
            Some(NoticeKind::SinkGone),
            "another pod's gone does not count as this pod's"
        );
    }

    /// A notifier whose client never connects (content only).
    async fn notifier(pod: &str) -> Notifier {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        Notifier::new(
            client,
            "team/gh",
            "http://sink/hooks",
            pod.into(),
            Arc::new(Metrics::new(&mut reg)),
        )
    }

    #[tokio::test]
    async fn heard_notices_count_only_from_other_pods_of_the_endpoint() {
        let a = notifier("gh-processor-a").await;
        let b = notifier("gh-processor-b").await;
        let gone = a.notice_for(Some(410)).unwrap();
        // Its own notice (the subscription echoes it) changes nothing.
        let other = SinkNotice {
            endpoint: "team/other".into(),
            ..gone.clone()
        };
        let gone = serde_json::to_vec(&gone).unwrap();
        assert!(!a.heard(&gone));
        assert!(!b.heard(b"not json"));
        assert!(!b.heard(&serde_json::to_vec(&other).unwrap()));
        assert!(b.notice_for(Some(200)).is_none());

        assert!(b.heard(&gone));
        let ok = b.notice_for(Some(200)).unwrap();
        assert_eq!(ok.kind, NoticeKind::SinkOk);
        assert_eq!(ok.pod, "gh-processor-b");
        assert!(b.notice_for(Some(200)).is_none(), "one ok");
        // b's ok reaches a, which then has nothing to send.
        assert!(a.heard(&serde_json::to_vec(&ok).unwrap()));
        assert!(a.notice_for(Some(200)).is_none());
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
        assert_eq!(n.subject, "spillway.notice.team.gh_v2");
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
