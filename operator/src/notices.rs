//! Sink notices: processors (which have no Kubernetes API access) report on
//! core NATS when their sink answers 410 Gone and when it recovers
//! ([`SinkNotice`] on `spillway.notice.<namespace>.<name>`). The leader keeps the latest
//! state per endpoint in memory, reconciles the endpoint when it changes,
//! and the reconcile turns it into the `SinkAvailable` condition.
//!
//! `SinkAvailable` is False (reason `SinkGone`) from a `sink_gone` notice
//! until a `sink_ok` notice (`SinkRecovered`), a
//! [quiet period](crate::Settings::sink_gone_quiet_period) without
//! `sink_gone` (`GoneNotRepeated`), or a change of the sink (`SinkChanged`).
//! Otherwise it is True (`NoGoneReported`). It does not affect `Ready`:
//! webhooks are still accepted and kept.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use spillway_api::WebhookEndpoint;
use spillway_api::condition::SINK_AVAILABLE;
use spillway_api::names::{EndpointNames, NOTICE_SUBJECTS};
use spillway_api::wire::{NoticeKind, SinkNotice};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use spillway_api::condition::{Desired, Reason, Status};

/// Reason while the sink answers 410 Gone.
pub const SINK_GONE: &str = "SinkGone";

/// The last `sink_gone` notice for an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gone {
    /// When the operator received it (its own clock, not the pod's).
    pub at: Timestamp,
    /// The sink it was about, redacted as in the notice.
    pub sink: String,
}

/// What is known about one endpoint's sink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked {
    /// The latest `sink_gone`, if any.
    pub gone: Option<Gone>,
    /// A `sink_ok` arrived after it.
    pub recovered: bool,
}

impl Tracked {
    /// Whether this says "gone" for `sink` at `now`.
    fn gone_for(&self, sink: &str, now: Timestamp, quiet: Duration) -> bool {
        self.gone
            .as_ref()
            .is_some_and(|g| !self.recovered && g.sink == sink && since(g.at, now) < quiet)
    }
}

fn since(then: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or(Duration::ZERO)
}

/// The `SinkAvailable` condition for an endpoint whose sink (redacted) is
/// `sink`, from what is `tracked` and the condition as it is (`old`). Also
/// returns when to look again (the end of the quiet period) while it is
/// False.
pub fn sink_condition(
    tracked: Option<&Tracked>,
    sink: &str,
    dead_letters: bool,
    redrive: &str,
    old: Option<&Condition>,
    now: Timestamp,
    quiet: Duration,
) -> (Desired, Option<Duration>) {
    let d = |status, reason: Reason, message: String| {
        Desired::new(SINK_AVAILABLE, status, reason, message)
    };
    let quiet_text = spillway_api::duration::format(quiet);
    match tracked.and_then(|t| t.gone.as_ref().map(|g| (g, t.recovered))) {
        Some((g, false)) if g.sink == sink => {
            let elapsed = since(g.at, now);
            if elapsed < quiet {
                let fate = if dead_letters {
                    format!(
                        "every delivery is dead-lettered (reason gone). Fix processor.sink, then redrive the dead letters with `{redrive}`"
                    )
                } else {
                    "every delivery is dropped (dead letters are disabled). Fix processor.sink"
                        .to_owned()
                };
                return (
                    d(
                        Status::False,
                        Reason::SinkGone,
                        format!(
                            "the sink {sink} answers 410 Gone: it says it no longer exists. Webhooks are still accepted and stored, but {fate}. Clears on the next successful delivery, after {quiet_text} without 410, or when processor.sink changes"
                        ),
                    ),
                    Some(quiet - elapsed),
                );
            }
            (
                d(
                    Status::True,
                    Reason::GoneNotRepeated,
                    format!("no 410 Gone from the sink {sink} for {quiet_text}"),
                ),
                None,
            )
        }
        Some((g, true)) if g.sink == sink => (
            d(
                Status::True,
                Reason::SinkRecovered,
                format!("the sink {sink} accepted a delivery again after answering 410 Gone"),
            ),
            None,
        ),
        // A 410 from another sink than the one in the spec now: the spec
        // changed (or a processor of the old spec is still rolling out).
        Some(_) if old.is_some_and(|c| Status::of(c) == Status::False) => (
            d(
                Status::True,
                Reason::SinkChanged,
                format!("processor.sink changed to {sink} since the old sink answered 410 Gone"),
            ),
            None,
        ),
        _ => match old {
            // Nothing new: keep what is there (no write after a restart).
            Some(c) if Status::of(c) == Status::True => (
                d(
                    Status::True,
                    Reason::parse(&c.reason).unwrap_or(Reason::NoGoneReported),
                    c.message.clone(),
                ),
                None,
            ),
            _ => (
                d(
                    Status::True,
                    Reason::NoGoneReported,
                    "no processor has reported 410 Gone from the sink".to_owned(),
                ),
                None,
            ),
        },
    }
}

/// The latest sink state per endpoint (`namespace/name`), for one term of
/// leadership.
#[derive(Debug)]
pub struct SinkNotices {
    quiet: Duration,
    map: Mutex<HashMap<String, Tracked>>,
}

impl SinkNotices {
    /// Empty, with a quiet period of `quiet`.
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            map: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take in a notice for `endpoint` received at `now`. True when it
    /// changes what the condition says (the endpoint should be reconciled).
    pub fn record(&self, endpoint: &str, notice: &SinkNotice, now: Timestamp) -> bool {
        let mut map = self.lock();
        let t = map.entry(endpoint.to_owned()).or_default();
        match notice.kind {
            NoticeKind::SinkGone => {
                let was = t.gone_for(&notice.sink, now, self.quiet);
                t.gone = Some(Gone {
                    at: now,
                    sink: notice.sink.clone(),
                });
                t.recovered = false;
                !was
            }
            NoticeKind::SinkOk => {
                let change = t.gone.is_some() && !t.recovered;
                t.recovered |= t.gone.is_some();
                change
            }
        }
    }

    /// The `SinkAvailable` condition (see [`sink_condition`]). An endpoint
    /// the operator knows nothing about but whose status says `SinkGone`
    /// (after a restart or a change of leader) stays gone for a quiet period
    /// from now, unless a notice says otherwise.
    pub fn condition(
        &self,
        endpoint: &str,
        sink: &str,
        dead_letters: bool,
        old: Option<&Condition>,
        now: Timestamp,
    ) -> (Desired, Option<Duration>) {
        let mut map = self.lock();
        if !map.contains_key(endpoint)
            && old.is_some_and(|c| Status::of(c) == Status::False && c.reason == SINK_GONE)
        {
            map.insert(
                endpoint.to_owned(),
                Tracked {
                    gone: Some(Gone {
                        at: now,
                        sink: sink.to_owned(),
                    }),
                    recovered: false,
                },
            );
        }
        let redrive = format!("spillway dlq redrive {endpoint} --all");
        sink_condition(
            map.get(endpoint),
            sink,
            dead_letters,
            &redrive,
            old,
            now,
            self.quiet,
        )
    }

    /// Forget a deleted endpoint.
    pub fn forget(&self, endpoint: &str) {
        self.lock().remove(endpoint);
    }
}

/// The endpoint a notice on `subject` is about, when the subject and the
/// notice's `endpoint` agree (so a publisher allowed only on its own
/// endpoint's subject cannot speak for another).
pub fn endpoint_of(subject: &str, notice: &SinkNotice) -> Option<(String, String)> {
    let (ns, name) = notice.endpoint.split_once('/')?;
    let names = EndpointNames::new(ns, name);
    // Processors of the previous release send the one-token subject.
    (names.notice_subject() == subject || names.legacy_notice_subject() == subject)
        .then(|| (ns.to_owned(), name.to_owned()))
}

/// Subscribe to every endpoint's notices and feed them into `notices`,
/// asking for a reconcile (through `retrigger`) when an endpoint's state
/// changes. Runs until the subscription ends (the client is closed); the
/// client resubscribes by itself after reconnects. Notices about endpoints
/// not in `endpoints` (other namespaces, deleted) are ignored.
pub async fn listen(
    client: async_nats::Client,
    endpoints: Store<WebhookEndpoint>,
    notices: std::sync::Arc<SinkNotices>,
    retrigger: mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
) {
    let mut sub = loop {
        match client.subscribe(NOTICE_SUBJECTS).await {
            Ok(s) => break s,
            Err(e) => {
                warn!(error = %e, "cannot subscribe to sink notices yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    debug!(subject = NOTICE_SUBJECTS, "listening for sink notices");
    while let Some(msg) = sub.next().await {
        let notice: SinkNotice = match serde_json::from_slice(&msg.payload) {
            Ok(n) => n,
            Err(e) => {
                debug!(subject = %msg.subject, error = %e, "ignoring a malformed sink notice");
                continue;
            }
        };
        let Some((ns, name)) = endpoint_of(msg.subject.as_str(), &notice) else {
            debug!(subject = %msg.subject, endpoint = %notice.endpoint, "ignoring a sink notice whose subject does not match its endpoint");
            continue;
        };
        let r = ObjectRef::<WebhookEndpoint>::new(&name).within(&ns);
        if endpoints.get(&r).is_none() {
            debug!(endpoint = %notice.endpoint, "ignoring a sink notice for an unknown endpoint");
            continue;
        }
        let changed = notices.record(&notice.endpoint, &notice, Timestamp::now());
        if changed {
            info!(endpoint = %notice.endpoint, kind = notice.kind.as_str(), status = notice.status, pod = %notice.pod, sink = %notice.sink, "sink notice");
            let _ = retrigger.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const QUIET: Duration = Duration::from_secs(600);
    const SINK: &str = "http://app.team.svc:8080/hooks";

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn notice(kind: NoticeKind, sink: &str) -> SinkNotice {
        SinkNotice {
            kind,
            endpoint: "team/gh".into(),
            status: if kind == NoticeKind::SinkGone {
                410
            } else {
                200
            },
            at: "2026-01-01T00:00:00Z".into(),
            pod: "gh-processor-1".into(),
            sink: sink.into(),
        }
    }

    fn cond(status: &str, reason: &str) -> Condition {
        Condition {
            type_: SINK_AVAILABLE.into(),
            status: status.into(),
            reason: reason.into(),
            message: "m".into(),
            observed_generation: Some(1),
            last_transition_time: Time(t(0)),
        }
    }

    fn reason(n: &SinkNotices, old: Option<&Condition>, now: i64) -> (Status, Reason) {
        let (d, _) = n.condition("team/gh", SINK, true, old, t(now));
        (d.status, d.reason)
    }

    #[test]
    fn gone_until_ok() {
        let n = SinkNotices::new(QUIET);
        assert_eq!(reason(&n, None, 0), (Status::True, Reason::NoGoneReported));
        assert!(n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(1)));
        let (d, recheck) = n.condition("team/gh", SINK, true, None, t(61));
        assert_eq!((d.status, d.reason), (Status::False, Reason::SinkGone));
        assert_eq!(recheck, Some(QUIET - Duration::from_secs(60)));
        assert!(d.message.contains("410 Gone"), "{}", d.message);
        assert!(d.message.contains(SINK), "{}", d.message);
        assert!(
            d.message.contains("`spillway dlq redrive team/gh --all`"),
            "{}",
            d.message
        );
        // Repeated gone notices change nothing (no reconcile, same message).
        assert!(!n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(31)));
        assert_eq!(n.condition("team/gh", SINK, true, None, t(62)).0, d);
        // The first ok clears it; a second ok is no news.
        assert!(n.record("team/gh", &notice(NoticeKind::SinkOk, SINK), t(90)));
        assert!(!n.record("team/gh", &notice(NoticeKind::SinkOk, SINK), t(91)));
        assert_eq!(reason(&n, None, 92), (Status::True, Reason::SinkRecovered));
        // Gone again.
        assert!(n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(100)));
        assert_eq!(reason(&n, None, 101).0, Status::False);
    }

    #[test]
    fn ok_without_gone_is_no_news() {
        let n = SinkNotices::new(QUIET);
        assert!(!n.record("team/gh", &notice(NoticeKind::SinkOk, SINK), t(0)));
        assert_eq!(reason(&n, None, 1), (Status::True, Reason::NoGoneReported));
    }

    #[test]
    fn quiet_period_clears_it() {
        let n = SinkNotices::new(QUIET);
        n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(0));
        assert_eq!(reason(&n, None, 599).0, Status::False);
        assert_eq!(
            reason(&n, None, 600),
            (Status::True, Reason::GoneNotRepeated)
        );
        // A gone after the quiet period is news again.
        assert!(n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(700)));
    }

    #[test]
    fn a_changed_sink_clears_it_and_stale_notices_are_ignored() {
        let n = SinkNotices::new(QUIET);
        n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(0));
        let gone = cond("False", SINK_GONE);
        let (d, recheck) = n.condition("team/gh", "http://new/hooks", true, Some(&gone), t(5));
        assert_eq!((d.status, d.reason), (Status::True, Reason::SinkChanged));
        assert!(d.message.contains("http://new/hooks"));
        assert_eq!(recheck, None);
        // A late 410 from a pod of the old spec does not flip it back.
        n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(6));
        let now_true = cond("True", Reason::SinkChanged.as_str());
        let (d, _) = n.condition("team/gh", "http://new/hooks", true, Some(&now_true), t(7));
        assert_eq!((d.status, d.reason), (Status::True, Reason::SinkChanged));
    }

    #[test]
    fn after_a_restart_gone_is_kept_for_a_quiet_period() {
        let n = SinkNotices::new(QUIET);
        let gone = cond("False", SINK_GONE);
        assert_eq!(reason(&n, Some(&gone), 1000).0, Status::False);
        assert_eq!(reason(&n, Some(&gone), 1599).0, Status::False);
        assert_eq!(reason(&n, Some(&gone), 1600).0, Status::True);
        // A True condition is kept as it is (no write after a restart).
        let n = SinkNotices::new(QUIET);
        let ok = cond("True", Reason::SinkRecovered.as_str());
        let (d, _) = n.condition("team/gh", SINK, true, Some(&ok), t(0));
        assert_eq!((d.reason, d.message.as_str()), (Reason::SinkRecovered, "m"));
        n.forget("team/gh");
    }

    #[test]
    fn without_dead_letters_the_message_says_dropped() {
        let n = SinkNotices::new(QUIET);
        n.record("team/gh", &notice(NoticeKind::SinkGone, SINK), t(0));
        let (d, _) = n.condition("team/gh", SINK, false, None, t(1));
        assert!(d.message.contains("dropped"), "{}", d.message);
        assert!(!d.message.contains("redrive"), "{}", d.message);
    }

    #[test]
    fn subject_and_endpoint_must_agree() {
        let n = notice(NoticeKind::SinkGone, SINK);
        let subject = EndpointNames::new("team", "gh").notice_subject();
        assert_eq!(
            endpoint_of(&subject, &n),
            Some(("team".into(), "gh".into()))
        );
        let other = EndpointNames::new("team", "other").notice_subject();
        assert_eq!(endpoint_of(&other, &n), None);
        assert_eq!(endpoint_of("spillway.dlq.team_gh", &n), None);
        // The previous release's one-token subject is still understood.
        assert_eq!(
            endpoint_of("spillway.notice.team_gh", &n),
            Some(("team".into(), "gh".into()))
        );
        let mut bad = n.clone();
        bad.endpoint = "no-slash".into();
        assert_eq!(endpoint_of(&subject, &bad), None);
    }
}
