//! `status.conditions`: the condition types, their status, every reason
//! the operator writes (documented once, here; `docs/reference.md` lists
//! them), and the pure rules: the `Ready` summary, the merge that keeps
//! `lastTransitionTime` unless a status flips, and the transitions that get
//! Events. The operator writes conditions with these; the CLI, `local/` and
//! the tests read them with [`Status::of`] and [`is`].

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// True when `Accepted`, `StreamReady` and `ProcessorReady` are.
pub const READY: &str = "Ready";
/// The spec, its Secrets and its path are valid.
pub const ACCEPTED: &str = "Accepted";
/// The JetStream streams and consumers are in place.
pub const STREAM_READY: &str = "StreamReady";
/// The processor Deployment serves the endpoint.
pub const PROCESSOR_READY: &str = "ProcessorReady";
/// False (reason `SinkGone`) while processors report that the sink answers
/// 410 Gone; not part of `Ready`.
pub const SINK_AVAILABLE: &str = "SinkAvailable";

/// The status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet), e.g. while an earlier step blocks this one.
    Unknown,
}

impl Status {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }

    /// From the API spelling; anything else is `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => Status::True,
            "False" => Status::False,
            _ => Status::Unknown,
        }
    }

    /// The status of a written condition.
    pub fn of(c: &Condition) -> Self {
        Self::parse(&c.status)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `conditions` holds a condition of `type_` with `status`.
pub fn is(conditions: &[Condition], type_: &str, status: Status) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && Status::of(c) == status)
}

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])+ $name:ident ),+ $(,)?) => {
        /// Every reason the operator writes into a condition.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $( $(#[doc = $doc])+ $name, )+
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$name),+];

            /// The API spelling (PascalCase).
            pub fn as_str(self) -> &'static str {
                match self { $(Reason::$name => stringify!($name),)+ }
            }

            /// What the reason means (its documentation).
            pub fn describe(self) -> &'static str {
                match self { $(Reason::$name => concat!($($doc),+),)+ }
            }

            /// From the API spelling.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $(stringify!($name) => Some(Reason::$name),)+ _ => None }
            }
        }
    };
}

reasons! {
    /// Ready: the endpoint accepts and delivers webhooks.
    Ready,
    /// Ready, not yet evaluated: a part has not been judged yet.
    Pending,
    /// Ready: suspended; the gateway answers 503 with Retry-After, stored webhooks are still delivered.
    Suspended,
    /// Ready and ProcessorReady: delivery paused; webhooks are accepted and stored.
    Paused,
    /// Accepted: spec, Secrets and path are valid.
    Accepted,
    /// Accepted=False: the spec fails a check the API server cannot make (the message lists each problem).
    InvalidSpec,
    /// Accepted=False: a referenced Secret does not exist.
    SecretNotFound,
    /// Accepted=False: a referenced Secret has no such key.
    SecretKeyMissing,
    /// Accepted=False: a referenced Secret key is empty (after trimming whitespace).
    SecretKeyEmpty,
    /// Accepted=False: a `whsec_` secret whose rest is not valid base64.
    SecretKeyInvalid,
    /// Accepted=False: an older endpoint serves the same path.
    PathConflict,
    /// StreamReady and ProcessorReady Unknown: waiting for the endpoint to be accepted.
    NotAccepted,
    /// StreamReady: the streams and consumers are in place.
    StreamReady,
    /// StreamReady=True: a larger ordering.partitions waits until no partition holds a webhook.
    PartitionsChangeWaiting,
    /// StreamReady=True: a consumer not Spillway's has webhooks on the work stream it has not taken, and the stream keeps them for it, taking its capacity (the message names it).
    ForeignConsumerHolding,
    /// StreamReady=False: the work stream holds maxBytes or maxMessages of undelivered webhooks; the gateway answers 503 until it drains.
    BacklogFull,
    /// StreamReady=False: NATS is unreachable or did not answer.
    NatsUnavailable,
    /// StreamReady=False: a change JetStream cannot apply in place (storage, retention).
    StreamConfigImmutable,
    /// StreamReady=False: ordering with fewer partitions than still hold undelivered webhooks.
    PartitionsWouldStrandWebhooks,
    /// StreamReady=False: JetStream refused a create or update (its message is quoted).
    StreamRejected,
    /// StreamReady=False: lowered limits would make JetStream delete undelivered webhooks.
    LimitsWouldDropWebhooks,
    /// ProcessorReady: at least one processor replica is ready.
    Available,
    /// ProcessorReady: no backlog, scaled to zero replicas.
    ScaledToZero,
    /// ProcessorReady=False: no processor replica is ready.
    PodsNotReady,
    /// ProcessorReady=False: a NATS Secret the processor pods mount does not exist in the namespace.
    NatsSecretNotFound,
    /// ProcessorReady=False: a NATS Secret the processor pods mount lacks a key.
    NatsSecretKeyMissing,
    /// ProcessorReady=False: a Deployment of that name exists and is not Spillway's.
    DeploymentConflict,
    /// ProcessorReady: `autoscaler: keda` but KEDA is not installed; builtin scaling is used.
    KedaNotInstalled,
    /// SinkAvailable=False: processors report that the sink answers 410 Gone.
    SinkGone,
    /// SinkAvailable=True: no processor reported 410 Gone.
    NoGoneReported,
    /// SinkAvailable=True: a delivery succeeded after 410 Gone.
    SinkRecovered,
    /// SinkAvailable=True: no 410 Gone for the quiet period.
    GoneNotRepeated,
    /// SinkAvailable=True: the sink changed since the 410 Gone.
    SinkChanged,
    /// Accepted=False (listener): the WebhookEndpoint it names does not exist.
    EndpointNotFound,
    /// Accepted=False (listener): the endpoint's `allowedListeners` does not admit the listener's namespace.
    NotAllowed,
    /// Accepted=False (listener): `eventTypes` or `filter` does not compile.
    FilterInvalid,
    /// Accepted=False (listener): the endpoint is ordered; listeners serve unordered endpoints only.
    OrderingUnsupported,
    /// StreamReady=False (listener): the endpoint's work stream does not exist yet.
    StreamMissing,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A condition as the reconciler wants it, before times are filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Condition type, e.g. `Accepted`.
    pub type_: &'static str,
    /// True, False or Unknown.
    pub status: Status,
    /// Why.
    pub reason: Reason,
    /// Message a user can act on.
    pub message: String,
}

impl Desired {
    /// A condition with the given fields.
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: Reason,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The `Ready` condition summarising `Accepted`, `StreamReady` and
/// `ProcessorReady`: True when all three are True; otherwise False (or
/// Unknown when nothing failed but something is unknown) with the reason and
/// message of the first condition that is not True.
pub fn ready(parts: &[Desired]) -> Desired {
    let order = [ACCEPTED, STREAM_READY, PROCESSOR_READY];
    let mut first_unknown = None;
    for t in order {
        match parts.iter().find(|c| c.type_ == t) {
            Some(c) if c.status == Status::True => {}
            Some(c) if c.status == Status::False => {
                return Desired::new(
                    READY,
                    Status::False,
                    c.reason,
                    format!("{t}: {}", c.message),
                );
            }
            Some(c) => {
                first_unknown.get_or_insert_with(|| {
                    Desired::new(
                        READY,
                        Status::Unknown,
                        c.reason,
                        format!("{t}: {}", c.message),
                    )
                });
            }
            None => {
                first_unknown.get_or_insert_with(|| {
                    Desired::new(
                        READY,
                        Status::Unknown,
                        Reason::Pending,
                        format!("{t} not yet evaluated"),
                    )
                });
            }
        }
    }
    first_unknown.unwrap_or_else(|| {
        Desired::new(
            READY,
            Status::True,
            Reason::Ready,
            "the endpoint accepts and delivers webhooks",
        )
    })
}

/// Merge the desired conditions into the existing ones: every condition
/// gets `observedGeneration = generation`; `lastTransitionTime` is kept from
/// the existing condition of the same type when its status is unchanged and
/// set to `now` otherwise. Existing conditions of other types are dropped
/// (the operator owns the whole list). Order follows `desired`.
pub fn merge(
    old: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let prev = old.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match prev {
                Some(p) if Status::of(p) == d.status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: d.status.as_str().to_owned(),
                reason: d.reason.as_str().to_owned(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// A condition whose status changed: `(type, old status, new status)`.
pub type Transition = (String, Option<Status>, Status);

/// The conditions whose status differs between `old` and `new`, for
/// Events on transitions.
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    new.iter()
        .filter_map(|n| {
            let o = old.iter().find(|c| c.type_ == n.type_).map(Status::of);
            (o != Some(Status::of(n))).then(|| (n.type_.clone(), o, Status::of(n)))
        })
        .collect()
}

/// The reasons as a Markdown table (for `docs/reference.md`).
pub fn reasons_markdown() -> String {
    let mut out = String::from("| reason | meaning |\n| --- | --- |\n");
    for r in Reason::ALL {
        out.push_str(&format!("| `{r}` | {} |\n", r.describe().trim()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn all_true() -> Vec<Desired> {
        vec![
            Desired::new(ACCEPTED, Status::True, Reason::Accepted, "ok"),
            Desired::new(STREAM_READY, Status::True, Reason::StreamReady, "ok"),
            Desired::new(PROCESSOR_READY, Status::True, Reason::Available, "ok"),
        ]
    }

    #[test]
    fn ready_is_true_only_when_all_parts_are() {
        assert_eq!(ready(&all_true()).status, Status::True);
        let mut parts = all_true();
        parts[1] = Desired::new(STREAM_READY, Status::False, Reason::NatsUnavailable, "down");
        parts[2] = Desired::new(PROCESSOR_READY, Status::False, Reason::PodsNotReady, "0/1");
        let r = ready(&parts);
        assert_eq!(r.status, Status::False);
        assert_eq!(r.reason, Reason::NatsUnavailable);
        assert!(r.message.starts_with("StreamReady: "));
    }

    #[test]
    fn ready_false_beats_unknown() {
        let mut parts = all_true();
        parts[0] = Desired::new(ACCEPTED, Status::Unknown, Reason::Pending, "");
        parts[2] = Desired::new(PROCESSOR_READY, Status::False, Reason::PodsNotReady, "0/1");
        assert_eq!(ready(&parts).reason, Reason::PodsNotReady);
        parts[2] = Desired::new(PROCESSOR_READY, Status::True, Reason::Available, "");
        let r = ready(&parts);
        assert_eq!((r.status, r.reason), (Status::Unknown, Reason::Pending));
        assert_eq!(ready(&parts[..1]).status, Status::Unknown);
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let first = merge(&[], &all_true(), Some(1), &t(100));
        assert!(first.iter().all(|c| c.last_transition_time == t(100)));
        assert!(first.iter().all(|c| c.observed_generation == Some(1)));

        // Same statuses, new reason/message and generation: times kept.
        let mut d = all_true();
        d[2].message = "2/2 ready".into();
        let second = merge(&first, &d, Some(2), &t(200));
        assert!(second.iter().all(|c| c.last_transition_time == t(100)));
        assert!(second.iter().all(|c| c.observed_generation == Some(2)));
        assert_eq!(second[2].message, "2/2 ready");

        // A flip moves only that condition's time.
        d[1] = Desired::new(STREAM_READY, Status::False, Reason::NatsUnavailable, "down");
        let third = merge(&second, &d, Some(2), &t(300));
        assert_eq!(third[0].last_transition_time, t(100));
        assert_eq!(third[1].last_transition_time, t(300));
        assert_eq!(third[1].status, "False");
        assert_eq!(third[1].reason, "NatsUnavailable");
        assert_eq!(
            transitions(&second, &third),
            vec![("StreamReady".to_owned(), Some(Status::True), Status::False)]
        );
        assert!(is(&third, STREAM_READY, Status::False));
        assert!(!is(&third, STREAM_READY, Status::True));
        // Merging the same desired state again is a fixpoint.
        assert_eq!(merge(&third, &d, Some(2), &t(400)), third);
        assert!(transitions(&third, &third).is_empty());
    }

    #[test]
    fn reasons_round_trip_and_are_documented() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(*r));
            assert!(!r.describe().trim().is_empty(), "{r}");
        }
        assert_eq!(Reason::parse("NoSuchReason"), None);
        assert_eq!(Status::parse("True"), Status::True);
        assert_eq!(Status::parse("maybe"), Status::Unknown);
        assert!(reasons_markdown().contains("| `BacklogFull` |"));
    }
}
